"""FAISS indexes over a store's keys: budget-driven choice, training, recall tuning.

Retrieval stores use inner product over normalised sentence embeddings; kNN-LM stores use squared L2
over LM hidden states (``IndexConfig.metric``).

``auto`` picks from the number of vectors and the memory budget (as autofaiss does): exact ``Flat`` for
small stores; ``IVF,Flat`` when the float32 vectors fit the budget; otherwise ``IVF,PQ`` whose candidates
are re-ranked exactly against the memory-mapped fp16 keys. Then nprobe / efSearch is raised until
recall@10 against exact search on held-out keys reaches the target, and the choice, its parameters and
the measured recall are written to a metadata JSON beside the index.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ralm.datastore.keys import KeyParts, exact_search, tie_recall
from ralm.errors import RalmError
from ralm.utils.atomic import atomic_path, write_json

FLAT_MAX = 100_000  # below this, exact search is both fast enough and free of tuning
NAMED = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def parse_bytes(text: str) -> int:
    """Bytes of a size such as ``4GB``, ``512 MiB``, ``1.5g`` or ``1000000`` (binary units: 1 GB = 1024**3)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise RalmError(f"--memory-budget {text!r}: expected a positive number with an optional unit "
                        "B, KB, MB, GB or TB (KiB.. and K.. too), e.g. 512MB, 4GB or 1.5GB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


@dataclass
class IndexConfig:
    kind: str = field(default="auto", metadata={"help": "auto, flat, ivf, ivfpq, hnsw, or a FAISS factory string",
                                                "flag": "--index"})
    memory_budget: str = field(default="4GB", metadata={"help": "RAM the index may hold at search time (e.g. 4GB); "
                                                             "past it, auto keeps PQ codes on disk (memory-mapped) "
                                                             "and re-ranks exactly from the fp16 keys"})
    target_recall: float = field(default=0.95, metadata={"help": "recall@10 vs exact search to tune for"})
    n_queries: int = field(default=500, metadata={"help": "held-out keys used to measure recall"})
    # the kind of store fixes the metric (the builder sets it), so it is no command-line option
    metric: str = field(default="ip", metadata={"help": "'ip' (inner product) or 'l2' (squared distance)",
                                                "cli": False})
    seed: int = field(default=0, metadata={"help": "seed of the recall probe and index training sample",
                                           "cli": False})

    def __post_init__(self) -> None:
        if self.kind not in NAMED and "," not in self.kind and not re.match(r"^(Flat|HNSW|IVF|PQ|IDMap)", self.kind):
            raise RalmError(f"--index {self.kind!r}: expected one of {', '.join(NAMED)} or a FAISS factory string")
        if self.metric not in METRICS:
            raise RalmError(f"metric {self.metric!r}: expected 'ip' or 'l2'")
        if not 0 < self.target_recall <= 1:
            raise RalmError(f"--target-recall {self.target_recall}: must be in (0, 1]")
        self.budget_bytes = parse_bytes(self.memory_budget)


_IVF_LISTS = re.compile(r"IVF(\d+)")


def _faiss_reason(err: RuntimeError) -> str:
    """FAISS's own explanation from its exception text, without the C++ signature and source line."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    m = re.match(r"Error in .*? at \S+:\d+: (?:Error: '.*?' failed: )?(.*)", line)
    return (m.group(1) if m else line)[:200]


def factory_lists(factory: str, dim: int, metric: str = "ip") -> int | None:
    """Parse ``factory`` with FAISS for ``dim``-dim vectors: its IVF list count, or None if it has no IVF.

    Raises RuntimeError if FAISS cannot build it. Parsing costs nothing: each ``IVF<n>`` is parsed as
    ``IVF1`` because FAISS allocates every inverted list up front (gigabytes for ``IVF99999999``).
    """
    probe = faiss.index_factory(dim, _IVF_LISTS.sub("IVF1", factory), METRICS[metric])
    m = _IVF_LISTS.search(factory)
    if m:
        return int(m.group(1))
    ivf = faiss.try_extract_index_ivf(probe)  # e.g. IMI2x8: its list count comes from the parse
    return int(ivf.nlist) if ivf is not None else None


def check_factory(cfg: IndexConfig, dim: int) -> None:
    """Refuse an ``--index`` factory string FAISS cannot build for ``dim``-dim keys, before any key is encoded."""
    if cfg.kind in NAMED:
        return
    try:
        factory_lists(cfg.kind, dim, cfg.metric)
    except RuntimeError as e:
        raise RalmError(f"--index {cfg.kind}: FAISS cannot build it for {dim}-dim keys ({_faiss_reason(e)})") from None


def choose_factory(n: int, dim: int, cfg: IndexConfig) -> tuple[str, int]:
    """(FAISS factory string, re-rank factor) for ``n`` vectors of ``dim`` under the config."""
    nlist = max(16, min(65536, 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))
    kind = cfg.kind
    if kind == "auto":
        # fp32 vectors (flat, IVF-Flat) are resident; past the budget, PQ codes in inverted lists that
        # load_index memory-maps, re-ranked exactly from the (memory-mapped) fp16 keys
        fits = n * dim * 4 * 1.1 <= cfg.budget_bytes
        kind = "flat" if fits and n <= FLAT_MAX else "ivf" if fits else "ivfpq"
    if kind == "flat":
        return "IDMap,Flat", 1
    if kind == "ivf":
        return f"IVF{nlist},Flat", 1
    if kind == "ivfpq":
        m = next(m for m in (dim // 4, dim // 8, dim // 2, dim) if m and dim % m == 0 and m <= 96)
        return f"IVF{nlist},PQ{m}x8", 8
    if kind == "hnsw":
        return "IDMap,HNSW32,Flat", 1
    return kind, 1


@contextlib.contextmanager
def blas_always():
    """Make exhaustive search use BLAS for every batch size.

    FAISS scans the database once per query for batches with queries x dim below a threshold (128,000
    in 1.15), which makes batches of 1-300 queries several times slower than one BLAS pass.
    """
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


class DenseIndex:
    """A FAISS index over global row ids, with the tuned search parameters and optional exact re-rank.

    ``search`` returns FAISS's convention: inner products (largest first) or squared L2 distances
    (smallest first), -1 ids padded with the worst possible score.
    """

    def __init__(self, index: faiss.Index, meta: dict, keys: KeyParts | None):
        self.index, self.meta, self.keys = index, meta, keys
        self.rerank = int(meta.get("rerank", 1))
        self.metric = "l2" if meta.get("metric") == "l2" else "ip"
        self.params = dict(meta.get("params", {}))
        for name, value in self.params.items():
            faiss.ParameterSpace().set_index_parameter(self.index, name, value)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """D, I of shape (nq, k) over global row ids; ``allowed`` (sorted rows) restricts the search to a subset."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        kk = min(self.ntotal, k * self.rerank)
        worst = -np.inf if self.metric == "ip" else np.inf
        flat = _flat_view(self.index) if kk > 0 and allowed is None else None
        if flat is not None:
            xb, ids = flat
            D, I = _flat_search(xb, xq, kk, self.index.metric_type)  # noqa: E741
            if ids is not None:
                I = ids[I]  # noqa: E741
        else:
            # one query is faster on FAISS's own per-query scan (an IVF's coarse search: ~200 vs ~156 q/s
            # at 200k x 384, nprobe 128); batches gain from BLAS (flat at 16: ~340 vs ~90 q/s)
            params = self._selector_params(allowed) if allowed is not None else None
            with blas_always() if len(xq) > 1 else contextlib.nullcontext():
                D, I = self.index.search(xq, kk, params=params)  # noqa: E741
            D[I < 0] = worst  # FAISS pads filtered searches with +-FLT_MAX
        if self.rerank > 1 and self.keys is not None:
            # exact scores from the fp16 keys for the PQ candidates, then keep the best k
            safe = np.where(I < 0, 0, I)
            cand = self.keys.get(safe)  # (nq, kk, d)
            exact = np.einsum("qd,qcd->qc", xq, cand)
            if self.metric == "l2":
                exact = (xq * xq).sum(1)[:, None] - 2 * exact + (cand * cand).sum(2)
            exact[I < 0] = worst
            order = np.argsort(exact if self.metric == "l2" else -exact, axis=1, kind="stable")[:, :k]
            D, I = np.take_along_axis(exact, order, 1), np.take_along_axis(I, order, 1)  # noqa: E741
        if D.shape[1] < k:
            pad = k - D.shape[1]
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=worst)
            I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)  # noqa: E741
        return D[:, :k], I[:, :k]

    def _selector_params(self, allowed: np.ndarray) -> faiss.SearchParameters:
        """Search parameters that keep only ``allowed`` rows, carrying the tuned nprobe / efSearch."""
        mask = np.zeros(max(self.ntotal, int(allowed.max(initial=-1)) + 1), dtype=bool)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")  # FAISS reads bit (id & 7) of byte id >> 3
        sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        inner = _unwrap_idmap(self.index)
        frac = max(len(allowed), 1) / max(self.ntotal, 1)
        if isinstance(inner, faiss.IndexIVF):
            # a subset leaves a fraction f of each probed list: probing 1/f times more lists keeps the
            # number of candidates (and so the recall) about what the tuned nprobe gives on the whole store
            nprobe = min(inner.nlist, math.ceil(int(self.params.get("nprobe", inner.nprobe)) / frac))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif isinstance(inner, faiss.IndexHNSW):  # same reasoning: a wider beam for a sparser graph
            ef = math.ceil(int(self.params.get("efSearch", inner.hnsw.efSearch)) / frac)
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=min(ef, 1 << 16))
        else:
            params = faiss.SearchParameters(sel=sel)
        params._keep = (bitmap, sel)  # the selector reads the bitmap by pointer: keep both alive with params
        return params


def _unwrap_idmap(index: faiss.Index) -> faiss.Index:
    """The index inside an IDMap wrapper (or the index itself)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _flat_view(index: faiss.Index) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Zero-copy (ntotal, d) float32 view of a Flat (IP or L2) index's vectors, plus its IDMap ids."""
    inner = _unwrap_idmap(index)
    if not isinstance(inner, faiss.IndexFlat) or inner.metric_type not in METRICS.values() or inner.ntotal == 0:
        return None
    xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size()) if inner is not index else None
    return xb, ids


# Exact search runs as single-threaded FAISS calls on row ranges of the keys, shared by a pool of
# faiss.omp_get_max_threads() threads, instead of one FAISS call on that many OpenMP threads. Measured on the
# project's 2-core machine while other sessions kept it loaded (load average 4-10):
#  * FAISS's BLAS path runs an sgemm and an OpenMP heap update per 1024 keys (~100-400 parallel regions a
#    search), and its threads spin at each barrier for one that is not running: 640 queries (batch 16, 200k
#    random keys) took 43 s wall and 23 s CPU on 2 threads against 3.8 s and 2.0 s on 1 thread.
#    `benchmarks/search.py --quick` (50k MiniLM keys) beside 2 busy processes: the old path 5.3 q/s vs plain
#    FAISS 72.9 (0.07x; 0.89x even without them); this one 566 vs 65 (8.7x), batch 1 96 vs 14, batch 1024
#    517 vs 209. OMP_WAIT_POLICY=PASSIVE also cured the spinning (43 -> 6.4 s), but only if set before FAISS
#    loads, for the whole process. One thread per call has no barrier to wait at: a busy core slows only the
#    range its thread holds, and the other thread takes the next range;
#  * the ranges are multiples of FAISS's 1024-key BLAS block, so every score is the one a single-threaded
#    FAISS call computes, and their number depends on the keys only, so results do not depend on the thread
#    count (exact ties are ordered by row); FAISS's own 2-thread results differ from its 1-thread ones by ulps;
#  * one query takes FAISS's per-query scan on each range, streaming the keys on every thread (16.0 of 23.6
#    GB/s in the same --quick run; a numpy gemv got 8-11 GB/s on the loaded machine); batches take BLAS.
# IVF / HNSW searches stay one FAISS call: their OpenMP loop is over queries (one barrier a search). On the
# --quick IVF1024 index, ralm / plain FAISS at the same nprobe was 0.84-1.21x over batches 1-1024 in two runs,
# idle or contended, i.e. run-to-run noise (batch 1 is the very same call); an A/B of batch 16 with and
# without the BLAS threshold gave 668 vs 658 q/s (median) loaded and 258 vs 270 contended.
FLAT_RANGES = 16  # at most: enough for a busy core's lag to be a small part of the search
FLAT_MIN_ROWS = 2048  # no range smaller: below that the pool costs more than it shares
_POOLS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of its parent's threads


def _flat_pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, "ralm-flat", initializer=faiss.omp_set_num_threads, initargs=(1,))
    return _POOLS[threads]


def _flat_search(xb: np.ndarray, xq: np.ndarray, k: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (D, I) of the ``k`` <= len(xb) best rows of ``xb`` for each query, FAISS's order and scores."""
    n, block = len(xb), int(faiss.cvar.distance_compute_blas_database_bs)
    ranges = max(1, min(FLAT_RANGES, n // FLAT_MIN_ROWS))
    step = block * math.ceil(n / (block * ranges))
    starts = range(0, n, step)

    def one(s: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = faiss.knn(xq, xb[s:s + step], min(k, n - s, step), metric=metric)  # noqa: E741
        return D, I + s

    threads = faiss.omp_get_max_threads()
    with blas_always() if len(xq) > 1 else contextlib.nullcontext():
        if threads > 1 and len(starts) > 1:
            parts = list(_flat_pool(threads).map(one, starts))
        else:  # one range or one thread: here, with no OpenMP team to wait for
            faiss.omp_set_num_threads(1)
            try:
                parts = [one(s) for s in starts]
            finally:
                faiss.omp_set_num_threads(threads)
    D, I = np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)  # noqa: E741
    sign = -1 if metric == faiss.METRIC_INNER_PRODUCT else 1
    if len(parts) > 1:
        top = np.argpartition(sign * D, k - 1, axis=1)[:, :k]
        D, I = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)  # noqa: E741
    order = np.lexsort((I, sign * D), axis=1)  # best first, ties by row
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def _tunable(index: faiss.Index) -> tuple[str, list[int]] | None:
    inner = _unwrap_idmap(index)
    if isinstance(inner, faiss.IndexIVF):
        return "nprobe", [2 ** i for i in range(int(math.log2(inner.nlist)) + 1)]
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None


def _exact(index: faiss.Index) -> bool:
    """Whether ``index`` is brute force (IDMap,Flat / Flat): its results are exact, bar the order of ties."""
    return isinstance(_unwrap_idmap(faiss.downcast_index(index)), faiss.IndexFlat)


def build_index(keys: KeyParts, rows: np.ndarray, cfg: IndexConfig, path: Path, log=print) -> dict:
    """Build, tune and write the index over global ``rows`` of ``keys``; return its metadata."""
    t0 = time.perf_counter()
    n, dim = len(rows), keys.dim
    if n == 0:
        raise RalmError("no chunks to index: the corpus produced no text")
    factory, rerank = choose_factory(n, dim, cfg)
    try:
        nlist = factory_lists(factory, dim, cfg.metric)
    except RuntimeError as e:
        raise RalmError(f"--index {cfg.kind}: FAISS cannot build {factory!r} for {dim}-dim keys "
                        f"({_faiss_reason(e)})") from None
    nq = min(cfg.n_queries, n)
    n_pool = n - nq if n > nq else n  # held-out recall queries are not trained on
    if nlist is not None and nlist > n_pool:
        # k-means cannot make more clusters than it has points; checked before the index allocates its lists
        fit = 1 << max(0, int(math.log2(max(n_pool // 39, 1))))
        raise RalmError(f"--index {cfg.kind}: IVF with nlist {nlist:,} needs at least {nlist:,} training vectors "
                        f"(FAISS wants ~{39 * nlist:,}) but the store has {n:,} chunks ({n_pool:,} for training); "
                        f"rerun with a smaller nlist (e.g. --index IVF{fit},Flat) or --index flat: "
                        "the finished shards are reused")
    index = faiss.index_factory(dim, factory, METRICS[cfg.metric])
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        # polysemous codes only speed up Hamming-filtered search, which we don't use; training them
        # costs minutes even on small samples
        ivf.do_polysemous_training = False
    rng = np.random.default_rng(cfg.seed)
    # held-out queries: keys excluded from training, so tuning is not measured on training points
    q_rows = np.sort(rng.choice(rows, nq, replace=False))
    if not index.is_trained:
        pool = np.setdiff1d(rows, q_rows) if n > nq else rows
        n_train = min(len(pool), max(256 * 64, 64 * getattr(ivf, "nlist", 256)))
        train_rows = np.sort(rng.choice(pool, n_train, replace=False))
        log(f"training {factory} on {n_train:,} of {n:,} keys")
        try:
            index.train(keys.get(train_rows))
        except RuntimeError as e:  # e.g. PQ codebooks need 2**nbits points each
            raise RalmError(f"--index {cfg.kind}: FAISS cannot train {factory} on the store's {n_train:,} "
                            f"training vectors ({_faiss_reason(e)}); rerun with another --index: "
                            "the finished shards are reused") from None
    for ids, xb in keys.blocks(rows):
        index.add_with_ids(xb, ids)
    t_build = time.perf_counter() - t0

    dense = DenseIndex(index, {"rerank": rerank}, keys)
    xq = keys.get(q_rows)
    D_exact, I_exact = exact_search(keys, xq, 10, rows, metric=cfg.metric)
    params: dict[str, int] = {}
    tunable = _tunable(index)
    with blas_always():
        if tunable is None:
            recall = tie_recall(keys, xq, dense.search(xq, 10)[1], D_exact, I_exact, cfg.metric)
        else:
            name, values = tunable
            for v in values:
                faiss.ParameterSpace().set_index_parameter(index, name, v)
                recall = tie_recall(keys, xq, dense.search(xq, 10)[1], D_exact, I_exact, cfg.metric)
                params = {name: v}
                if recall >= cfg.target_recall:
                    break
    # recall counts ties (duplicate keys), so an exact index, which has no recall to lose, is never warned about
    if recall < cfg.target_recall and not _exact(index):
        log(f"warning: {factory} reaches recall@10 {recall:.3f} < target {cfg.target_recall}; consider --index flat")
    meta = {
        "type": cfg.kind, "factory": factory, "metric": "l2" if cfg.metric == "l2" else "inner_product",
        "ntotal": n, "dim": dim,
        "params": params, "rerank": rerank, "recall_at_10": round(recall, 4), "recall_queries": nq,
        "target_recall": cfg.target_recall, "memory_budget_bytes": cfg.budget_bytes,
        "build_seconds": round(t_build, 2), "tune_seconds": round(time.perf_counter() - t0 - t_build, 2),
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    write_json(path.with_suffix(".json"), meta)
    return meta


def load_index(path: Path, meta: dict, keys: KeyParts | None) -> DenseIndex:
    """Load an index, memory-mapped where FAISS supports it for that index type (an IVF's inverted lists: they
    stay on disk, and a search pages in only the lists it probes)."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = faiss.read_index(str(path))
    return DenseIndex(index, meta, keys)
