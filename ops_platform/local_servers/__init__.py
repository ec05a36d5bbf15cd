"""Servers started on this machine: the sandbox's datastores and the scratch
targets of restore tests.

Plain Python, no Dagster import. Each server module exposes a function that
starts the server in a data directory on a loopback port and returns a
:class:`~ops_platform.local_servers.process.ServerProcess`.
"""

from ops_platform.local_servers.process import (
    ServerProcess,
    ServerStartError,
    free_port,
    port_is_open,
    wait_for_port,
)

__all__ = ["ServerProcess", "ServerStartError", "free_port", "port_is_open", "wait_for_port"]
