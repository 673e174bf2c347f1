"""The control plane: what every replica of the app must agree on, and the loops that keep it so.

- `state.py`: the app's state actor (expert generation, engine shape, restart claim) and the generation follower,
  a thread in each ingress replica.
- `plane.py`: the ingress replica's side: joins the state, reloads everywhere, drives engine restarts.
- `shape.py`: the engine shape the experts need (pure).
- `engine_slot.py`, `engine_follower.py`: an engine replica's side: its engine, swapped by a restart, and the two
  asyncio tasks that follow the target shape.
- `warm.py`: the warmer, a thread in each ingress replica keeping experts loaded on several engine replicas.
- `identity.py`: the Serve app and replica this process is.
"""
