"""Run shard steps in this process or as Ray tasks; both yield part records as shards finish."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ralm.errors import RalmError


class LocalExecutor:
    """Runs each step in the calling process, one at a time (models stay loaded between shards)."""

    name = "local"

    def map(self, fn: Callable[[Any], dict], tasks: Iterable[Any]) -> Iterator[dict]:
        for task in tasks:
            yield fn(task)

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs each step as a Ray task on an existing cluster; parts are written to a path all workers share.

    At most ``max_in_flight`` shards are submitted at once, so the driver holds a bounded number of
    shards in memory however large the corpus is.
    """

    name = "ray"

    def __init__(self, address: str | None, max_in_flight: int | None = None, num_cpus: float = 1.0):
        self.ray, self._owns_connection = connect_ray(address, "--executor ray")
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)
        self.num_cpus = num_cpus

    def map(self, fn: Callable[[Any], dict], tasks: Iterable[Any]) -> Iterator[dict]:
        remote = self.ray.remote(num_cpus=self.num_cpus, max_retries=2)(fn)
        pending: list[Any] = []
        for task in tasks:
            pending.append(remote.remote(task))
            if len(pending) >= self.max_in_flight:
                done, pending = self.ray.wait(pending, num_returns=1)
                yield from self.ray.get(done)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield from self.ray.get(done)

    def close(self) -> None:
        """Disconnect this driver (never stops the cluster; keeps a connection the caller made itself)."""
        if self._owns_connection:
            self.ray.shutdown()


def connect_ray(address: str | None, what: str) -> tuple[Any, bool]:
    """``ray`` connected to the running cluster at ``address`` (never a new one); whether this call connected."""
    if not address:
        # Without an address ray.init() would start (or silently join) a cluster on whatever interface
        # Ray picks; ralm only ever connects to a cluster the user started and named.
        raise RalmError(f"--ray-address is required with {what} (the address of a running "
                        "cluster, e.g. 127.0.0.1:6379)")
    try:
        import ray
    except ImportError:
        raise RalmError(f"{what}: ray is not installed (pip install 'ralm[ray]')") from None
    # Ray >= 2.5x clusters started with `ray start` expect token auth from clients; the token itself comes
    # from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (set RAY_AUTH_MODE=disabled to opt out)
    owns = not ray.is_initialized()
    if owns and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        _refresh_ray_auth_config()
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        raise RalmError(f"--ray-address {address}: cannot connect to a Ray cluster "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return ray, owns


def _refresh_ray_auth_config() -> None:
    """Make an already-imported Ray see a RAY_AUTH_MODE set after import (it caches its config on import)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # other Ray versions: nothing cached to refresh
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def make_executor(name: str, ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address)
    raise RalmError(f"--executor {name!r}: expected 'local' or 'ray'")
