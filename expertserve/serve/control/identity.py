"""Who this process is in the Serve app: its application name and replica id (read from Serve's replica context;
outside Serve, unit tests build the classes directly and get None / the process id)."""

from __future__ import annotations

import os


def app_name() -> str | None:
    """The Serve application this replica belongs to (None outside Serve)."""
    from ray import serve

    try:
        return serve.get_replica_context().app_name
    except Exception:  # outside a Serve replica
        return None


def replica_id() -> str:
    """This Serve replica's id (an engine replica's is `x-expertserve-replica`), or the process id outside one."""
    from ray import serve

    try:
        replica = serve.get_replica_context().replica_id
        return str(getattr(replica, "unique_id", replica))
    except Exception:
        return f"pid-{os.getpid()}"
