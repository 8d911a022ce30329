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
        try:
            import ray
        except ImportError:
            raise RalmError("--executor ray: ray is not installed (pip install 'ralm[ray]')") from None
        self.ray = ray
        # Ray >= 2.5x clusters started with `ray start` expect token auth from clients
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR",
                     include_dashboard=False if address is None else None)
        except Exception as e:
            raise RalmError(f"--ray-address {address}: cannot connect to a Ray cluster "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
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
        self.ray.shutdown()


def make_executor(name: str, ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address)
    raise RalmError(f"--executor {name!r}: expected 'local' or 'ray'")
