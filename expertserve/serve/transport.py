"""Which channel Ray Serve's data plane takes: its direct gRPC channels or Ray actor calls. Pure Python.

Serve reads the switch from each Ray process's environment when it starts (the proxy's hop to the ingress, the
default of every deployment handle), so it has to be in the environment Ray's nodes start with: `ray_env` gives
it for `expertserve serve` (which starts Ray itself) and the tests; the Kubernetes manifests and cluster configs
write the same variable. The ingress's own handles to the engine replicas also set it per handle (`by_reference`),
so that hop follows the config even on a cluster started without the variable.
"""

from __future__ import annotations

GRPC_SWITCH = "RAY_SERVE_USE_GRPC_BY_DEFAULT"
# Serve's gRPC channels take messages of 4 MiB by default: a whole (not streamed) answer with logprobs for many
# tokens is bigger, and failed after its compute. 64 MiB on every node (the server and the channels read it).
GRPC_MESSAGE_LIMIT = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
GRPC_MESSAGE_BYTES = 64 * 2**20


def ray_env(grpc_data_plane: bool) -> dict[str, str]:
    """The environment Ray's processes need for `ServeConfig.grpc_data_plane`."""
    return {GRPC_SWITCH: "1" if grpc_data_plane else "0", GRPC_MESSAGE_LIMIT: str(GRPC_MESSAGE_BYTES)}


def by_reference(grpc_data_plane: bool) -> bool:
    """Serve's handle option: True sends a request as a Ray actor call (object references), False over gRPC."""
    return not grpc_data_plane
