"""Joining a Ray cluster for ``tiermem bench --ray`` and ``tiermem serve --ray``; Ray is imported only here and in
the modules that call :func:`connect` (nothing else in tiermem imports it, so a run without ``--ray`` never does).

With no address, a local Ray starts inside this process on the loopback: Ray otherwise binds its services to the
machine's outward address, so ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before Ray is imported (Ray's own
switch for single-machine mode, which makes it resolve the node's address to 127.0.0.1). The dashboard is left
off: nothing here reads it, and it costs a process and memory on a 2-core machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from tiermem.errors import TiermemError

LOCAL_CPUS = 2
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Cluster:
    """What :func:`connect` joined: the cluster's address, whether this call connected (and so disconnects: a
    local cluster stops with it, a remote one goes on) and the cluster's CPUs."""

    address: str
    connected_here: bool
    cpus: float


def connect(address: str | None, num_cpus: int = LOCAL_CPUS) -> Cluster:
    """Join the Ray cluster at ``address`` (``host:port`` or ``auto``), or start a local one on the loopback with
    ``num_cpus`` CPUs when ``address`` is None. Joining twice returns the running connection."""
    if address is None and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_SWITCH, "0")  # read by Ray at import: the local node is 127.0.0.1
    try:
        import ray
    except ImportError:
        raise TiermemError("--ray needs Ray: pip install 'tiermem[ray]'") from None
    if ray.is_initialized():
        return Cluster(ray.get_runtime_context().gcs_address, False, ray.cluster_resources().get("CPU", 0.0))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    kwargs |= {"num_cpus": num_cpus} if address is None else {"address": address}
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise TiermemError(f"cannot join the Ray cluster at {address}: {exc}") from None
    joined = Cluster(ray.get_runtime_context().gcs_address, True, ray.cluster_resources().get("CPU", 0.0))
    if address is None and not joined.address.startswith("127.0.0.1:"):
        ray.shutdown()
        raise TiermemError(
            f"the local Ray bound {joined.address}, not the loopback: Ray was imported before "
            f"tiermem.raycluster.connect (set {LOOPBACK_SWITCH}=0 before importing it)"
        )
    return joined


def disconnect(cluster: Cluster) -> None:
    """Leave the cluster if :func:`connect` joined it (a local one stops with it); a connection made before by the
    caller (a test, a notebook) is left as it was."""
    import ray

    if cluster.connected_here and ray.is_initialized():
        ray.shutdown()
