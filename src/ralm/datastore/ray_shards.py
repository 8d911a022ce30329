"""The shards of a store set held by Ray actors on an existing cluster, so one set spans machines.

Each shard gets ``replicas`` actors; an actor opens the shard's store at its path (which must be readable on
the node it lands on: a shared filesystem, as for ``--executor ray`` builds), loads its index, and answers
``search_rows`` and ``chunks`` for the driver. ``RayShard`` is the driver's handle: it answers what a store set
asks of a shard (``ralm.datastore.store_set``), so a set over Ray shards searches exactly as over local ones.

Every call waits at most ``timeout_s`` in all. An actor that died, before the call or while it ran the call, is
dropped and the call goes to the shard's next replica within what is left of the timeout; with no replica left,
or past the timeout, the call is one ``RalmError`` naming the shard — never a hang.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ralm.core.retriever import Exclusions
from ralm.datastore.executors import connect_ray
from ralm.datastore.store import Datastore, RestrictedViews, store_sha256
from ralm.errors import RalmError, UnavailableError


class ShardActor:
    """One shard's store inside a Ray actor (the class is made remote in ``ray_shards``)."""

    def __init__(self, path: str) -> None:
        self.ds = Datastore.open(path)
        self.ds._get_index()  # noqa: SLF001 (load it now, not in the first search)
        self._views = RestrictedViews(self.ds)

    def describe(self) -> dict[str, Any]:
        return {"manifest": self.ds.manifest, "metric": self.ds.metric, "pid": os.getpid(),
                "manifest_sha256": store_sha256(self.ds)}

    def _view(self, allowed: np.ndarray | None) -> Datastore:
        return self.ds if allowed is None else self._views.get(allowed)[0]

    def search_rows(self, queries: Any, k: int, exclude_doc_ids: Exclusions,
                    allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self._view(allowed).search_rows(queries, k, exclude_doc_ids)

    def chunks(self, rows: list[int]) -> list[dict[str, Any]]:
        return self.ds.chunks(rows)


class RayShard:
    """A shard served by Ray actors, as a store set sees a shard (see the module docstring)."""

    def __init__(self, ray: Any, path: Path, actors: list[Any], described: dict[str, Any], timeout_s: float) -> None:
        self.ray, self.root, self.actors, self.timeout_s = ray, path, list(actors), timeout_s
        self.manifest: dict[str, Any] = described["manifest"]
        self.metric: str = described["metric"]
        self.manifest_sha256: str = described["manifest_sha256"]
        self.sparse = self.manifest["encoder"]["kind"] == "sparse"
        self.allowed: np.ndarray | None = None
        self._next = 0

    __len__ = Datastore.__len__  # the manifest's row count, or the restricted rows'

    def restrict(self, rows: np.ndarray) -> RayShard:
        view = RayShard.__new__(RayShard)
        view.__dict__.update(self.__dict__)
        view.allowed = np.unique(np.asarray(rows, dtype=np.int64))
        return view

    def _call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on a live replica, round-robin; a replica that dies (even mid-call) is dropped and the
        call retried on the next, all within one ``timeout_s``."""
        exc = self.ray.exceptions
        deadline = time.monotonic() + self.timeout_s
        while self.actors:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out()
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            ref = getattr(actor, method).remote(*args)
            try:
                return self.ray.get(ref, timeout=left)
            except exc.GetTimeoutError:
                self.ray.cancel(ref, force=False)
                raise self._timed_out() from None
            except (exc.RayActorError, exc.ActorDiedError, exc.ActorUnavailableError):
                # dead: the next replica answers. By identity, not position: views of this shard share the
                # list, and another thread's call may have dropped a replica meanwhile
                self.actors[:] = [a for a in self.actors if a is not actor]
            except exc.RayTaskError as e:  # the search itself failed inside the actor
                cause = e.as_instanceof_cause()
                if isinstance(cause, RalmError):
                    raise RalmError(str(cause)) from None
                raise RalmError(f"shard {self.root}: {type(cause).__name__} in its Ray actor: {cause}") from None
        raise UnavailableError(f"shard {self.root}: every Ray actor holding it died; restart the service or reopen "
                               "the set")

    def _timed_out(self) -> UnavailableError:
        return UnavailableError(f"shard {self.root}: no answer from its Ray actor within {self.timeout_s:g} s", 504)

    def search_rows(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        return self._call("search_rows", queries, k, exclude_doc_ids, self.allowed)

    def chunks(self, rows: list[int]) -> list[dict[str, Any]]:
        return self._call("chunks", [int(r) for r in rows])


def ray_shards(paths: list[Path], address: str, replicas: int = 1, timeout_s: float = 60.0,
               num_cpus: float = 0.0) -> list[RayShard]:
    """One ``RayShard`` per path, each with ``replicas`` actors started (and their stores opened) on the cluster
    at ``address``. ``num_cpus``: what each actor reserves (0: searches share the nodes' CPUs)."""
    if replicas < 1:
        raise RalmError(f"--replicas {replicas}: must be >= 1")
    ray, _ = connect_ray(address, "a store set on Ray")
    remote = ray.remote(num_cpus=num_cpus, max_restarts=0)(ShardActor)
    actors = [[remote.remote(str(p)) for _ in range(replicas)] for p in paths]
    out = []
    for p, group in zip(paths, actors, strict=True):
        try:
            described = ray.get([a.describe.remote() for a in group], timeout=max(timeout_s, 120.0))
        except ray.exceptions.RayTaskError as e:
            raise RalmError(f"shard {p}: its Ray actor could not open it ({e.as_instanceof_cause()})") from None
        except ray.exceptions.GetTimeoutError:
            raise RalmError(f"shard {p}: its Ray actors did not start within {max(timeout_s, 120.0):g} s") from None
        out.append(RayShard(ray, Path(p), group, described[0], timeout_s))
    return out
