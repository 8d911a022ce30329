"""Issue 16, the service: `ralm serve` answers as the local store does (ids and scores), refuses bad requests
with a JSON error and keeps serving, merges concurrent requests into one index search, drains on SIGTERM, and
`--datastore http://...` gives a method the same neighbours as the store directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from ralm.cli import app as cli_app
from ralm.core.retriever import RetrieverWrapper
from ralm.datastore.store import Datastore
from ralm.errors import RalmError, UnavailableError
from ralm.serve.app import create_app
from ralm.serve.client import TOKEN_ENV, RemoteStore, open_store
from ralm.serve.config import ServeConfig
from serve_helpers import ThreadServer, free_port, wait_healthy
from test_eval_cli import setup  # noqa: F401  (the module's store, built once)

TOKEN = "s3cret-token"
SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module")
def store(setup):  # noqa: F811  (the imported fixture, by name)
    """test_eval_cli's tiny store (12 documents, 16-token chunks, the tiny encoder) and its 3 held-out documents."""
    base, held = setup
    return base / "ds", held, Datastore.open(base / "ds")


@pytest.fixture(scope="module")
def served(store):
    """The tiny store behind a token, on a free loopback port."""
    path, _, ds = store
    with ThreadServer(create_app({"ds": ds}, ServeConfig(max_body_bytes=20_000, max_k=50), TOKEN)) as srv:
        yield srv


@pytest.fixture
def remote(served, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return RemoteStore(served.url)


def texts(ds: Datastore, rows) -> list[str]:
    return [ds.chunk(r)["text"] for r in rows]


def test_service_equals_local_search(store, remote):
    _, _, ds = store
    q = texts(ds, [0, 5, 9]) + ["river mountain music"]
    vecs = ds.encode(q)
    excl = [{ds.chunk(0)["doc_id"]}, set(), {ds.chunk(9)["doc_id"], "s3"}, None]
    for queries in (q, vecs):
        for kwargs in ({}, {"exclude_doc_ids": excl}, {"exclude_doc_ids": "s1"}):
            D, I = ds.search_rows(queries, 7, **kwargs)  # noqa: E741
            Dr, Ir = remote.search_rows(queries, 7, **kwargs)
            assert np.array_equal(I, Ir) and np.array_equal(D, Dr) and Dr.dtype == np.float32
    sub = np.arange(0, len(ds), 9)
    own = ds.chunk(0)["doc_id"]  # every row of the subset but that document's: -1 rows at the end too
    D, I = ds.restrict(sub).search_rows(q, len(sub), own)  # noqa: E741
    Dr, Ir = remote.restrict(sub).search_rows(q, len(sub), own)
    assert np.array_equal(I, Ir) and np.array_equal(D, Dr) and (Ir == -1).any() and np.isneginf(Dr[Ir == -1]).all()
    assert set(Ir[Ir >= 0].tolist()) <= set(sub.tolist())
    assert [h.__dict__ for h in remote.search(q, 3)[0]] == [h.__dict__ for h in ds.search(q, 3)[0]]
    assert remote.chunk(4) == ds.chunk(4) and remote.manifest == ds.manifest and len(remote) == len(ds)
    assert list(remote._doc_ids(np.array([[3, -1]]))[0]) == [ds.chunk(3)["doc_id"], ""]
    with pytest.raises(RalmError, match="k=0"):
        remote.search_rows(q, 0)


def post(url: str, body, token: str | None = TOKEN, raw: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw:
        return httpx.post(url + "/search", content=body, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url + "/search", json=body, headers=headers)


@pytest.mark.parametrize("body,token,status,needle", [
    (b'{"queries": ["a", ', TOKEN, 400, "malformed JSON"),
    ({"queries": ["river"], "k": 0}, TOKEN, 400, "k=0"),
    ({"queries": ["river"], "k": 51}, TOKEN, 400, "k=51"),
    ({"vectors": [[0.5] * 31], "k": 2}, TOKEN, 400, "dim 32"),
    ({"queries": ["x" * 30_000], "k": 2}, TOKEN, 413, "--max-body-bytes"),
    ({"queries": ["x" * 9000], "k": 2}, TOKEN, 400, "--max-query-bytes"),
    ({"queries": ["a"] * 300, "k": 2}, TOKEN, 400, "--max-queries"),
    ({"queries": ["river"], "vectors": [[0.0] * 32]}, TOKEN, 400, "not both"),
    ({"queries": ["river"], "k": "many"}, TOKEN, 422, "k"),
    ({"queries": ["river"], "store": "nope"}, TOKEN, 404, "nope"),
    ({"queries": ["river"], "exclude_doc_ids": [["a"], ["b"]]}, TOKEN, 400, "2 entries for 1 queries"),
    ({"queries": ["river"]}, None, 401, "missing bearer token"),
    ({"queries": ["river"]}, "guess", 401, "wrong bearer token"),
])
def test_bad_request_gets_its_error_and_the_server_keeps_serving(served, body, token, status, needle):
    r = post(served.url, body, token, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err and "\n" not in err
    ok = post(served.url, {"queries": ["river mountain"], "k": 3})
    assert ok.status_code == 200 and len(ok.json()["ids"][0]) == 3


def test_health_needs_no_token_but_everything_else_does(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    for route in ("/info", "/docs", "/openapi.json"):
        assert httpx.get(served.url + route).status_code == 401
    assert "/search" in httpx.get(served.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()["paths"]


def test_concurrent_requests_share_one_index_search(store):
    _, _, ds = store
    q = texts(ds, range(8))
    want = ds.search_rows(q, 4)

    async def run(cfg: ServeConfig) -> tuple[int, list]:
        app = create_app({"ds": ds}, cfg)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            rs = await asyncio.gather(*[client.post("/search", json={"queries": [t], "k": 4}) for t in q])
        return app.state.batcher.index_calls, [r.json() for r in rs]

    merged, out = asyncio.run(run(ServeConfig(max_wait_ms=200, max_batch=64)))
    alone, out_alone = asyncio.run(run(ServeConfig(max_wait_ms=0, max_batch=1)))
    assert merged == 1 and alone == 8
    # merged texts are encoded as one batch, as a local search of the same batch encodes them (an encoder's
    # floats can differ in the last bit with the batch's padding, so each is compared with its own local twin)
    singles = [ds.search_rows([t], 4) for t in q]
    for res, (D, I) in ((out, want), (out_alone, (np.concatenate([d for d, _ in singles]),
                                                  np.concatenate([i for _, i in singles])))):
        assert [r["ids"][0] for r in res] == I.tolist()
        assert np.array_equal(np.array([r["scores"][0] for r in res], dtype=np.float32), D)
    bounded, _ = asyncio.run(run(ServeConfig(max_wait_ms=200, max_batch=3)))
    assert bounded == 3  # 8 queries, at most 3 per search


def test_sigterm_drains_in_flight_requests(store):
    path, _, ds = store
    port = free_port()
    script = textwrap.dedent(f"""
        import time
        from ralm.datastore.store import Datastore
        from ralm.serve.app import serve
        from ralm.serve.config import ServeConfig
        ds = Datastore.open({str(path)!r})
        plain = ds.search_rows
        def slow(*a, **kw):  # a search still running when SIGTERM comes
            time.sleep(1.5)
            return plain(*a, **kw)
        ds.search_rows = slow
        serve(ServeConfig(port={port}), {{"ds": ds}})
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        vec = ds.encode(["river"]).tolist()
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/search", timeout=20,
                                                                       json={"vectors": vec, "k": 3})))
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(20)
        want = ds.search_rows(np.array(vec, dtype=np.float32), 3)[1].tolist()
        assert result["r"].status_code == 200 and result["r"].json()["ids"] == want
        # uvicorn re-raises the signal once drained: the process ends as killed by SIGTERM, without a traceback
        assert proc.wait(20) == -signal.SIGTERM and b"Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Recorder(RetrieverWrapper):
    def __init__(self, inner, seen: list) -> None:
        super().__init__(inner)
        self.seen = seen

    def search(self, queries, k, exclude_doc_ids=None):
        D, I = self.inner.search(queries, k, exclude_doc_ids)  # noqa: E741
        self.seen.append((D, I))
        return D, I


@pytest.mark.parametrize("method,subset", [("in-context", None), ("replug", 0.5)])
def test_eval_lm_over_http_equals_local(store, served, remote, tiny_lm, method, subset):
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig, run_eval_lm
    from ralm.lm.models import load
    from ralm.methods.in_context import InContextConfig

    path, held, _ = store
    lm = load(tiny_lm)
    runs = {}
    for where in (str(path), served.url):
        seen: list = []
        cfg = EvalLMConfig(model=tiny_lm, data=[str(held)], method=method, datastore=where, decontaminate=8, subset=subset,
                           options={"in_context": InContextConfig(stride=8, docs=2, doc_tokens=16)},
                           lm=LMEvalConfig(context=64))
        runs[where] = run_eval_lm(cfg, progress=False, loaded=lm, wrap_retriever=lambda r, s=seen: Recorder(r, s)), seen
    (local, seen_local), (http, seen_http) = runs.values()
    assert len(seen_local) == len(seen_http) > 0
    for (D, I), (Dh, Ih) in zip(seen_local, seen_http, strict=True):  # noqa: E741
        assert np.array_equal(I, Ih) and np.array_equal(D, Dh)
    assert local["ppl"] == http["ppl"] and local["tokens"] == http["tokens"]


def test_unreachable_or_silent_service_is_one_line(monkeypatch):
    port = free_port()
    with pytest.raises(RalmError, match=rf"http://127.0.0.1:{port}: cannot reach the retrieval service"):
        open_store(f"http://127.0.0.1:{port}")
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(RalmError, match=rf"{url}: no answer to /info within 0.3 s"):
            RemoteStore(url, timeout=0.3)


def test_a_restarted_service_is_retried_and_a_gone_one_is_one_line(store):
    _, _, ds = store
    first = ThreadServer(create_app({"ds": ds}, ServeConfig()))
    with first:
        remote = RemoteStore(first.url, retry_s=30)
        want = remote.search_rows(["river"], 3)
    later = ThreadServer(create_app({"ds": ds}, ServeConfig()), port=first.port)  # the service restarted
    timer = threading.Timer(1.0, later.__enter__)
    timer.start()
    try:
        t0 = time.monotonic()
        got = remote.search_rows(["river"], 3)  # refused until it is back, then answered
        assert time.monotonic() - t0 >= 0.5 and all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    finally:
        timer.join()
        later.__exit__()
    remote.retry_s = 0.5  # gone for good: one line once the retries are spent
    with pytest.raises(RalmError, match=rf"{first.url}: cannot reach the retrieval service"):
        remote.search_rows(["river"], 3)


def test_url_naming_a_store(served, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert RemoteStore(served.url + "/ds").name == "ds"
    with pytest.raises(RalmError, match="no store 'other' is served there"):
        RemoteStore(served.url + "/other")
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(RalmError, match="401 missing bearer token"):
        RemoteStore(served.url)


@pytest.mark.parametrize("args,needle", [
    (["nowhere"], "nowhere: no such datastore directory"),
    (["{ds}", "--max-k", "0"], "--max-k 0: must be >= 1"),
    (["{ds}", "--token-file", "no-such-file"], "--token-file no-such-file: no such file"),
    (["{ds}", "{ds}"], "another served store is named 'ds'"),
])
def test_serve_cli_refuses_bad_input(store, args, needle):
    path, _, _ = store
    r = CliRunner().invoke(cli_app, ["serve", *[a.format(ds=path) for a in args]])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_info_describes_the_store(served, store):
    _, _, ds = store
    info = httpx.get(served.url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["stores"]["ds"]
    assert (info["rows"], info["dim"], info["metric"], info["encoder"]) == (len(ds), 32, ds.metric, ds.encoder_name)
    assert info["manifest"]["tokenizer"]["fingerprint"] == ds.manifest["tokenizer"]["fingerprint"]
    assert json.dumps(info)  # plain JSON


class Misbehaving:
    """The store, but its next search raises a non-RalmError or takes too long (``mode``)."""

    def __init__(self, ds: Datastore) -> None:
        self.ds, self.mode = ds, None

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self) -> int:
        return len(self.ds)

    def search_rows(self, *a, **kw):
        mode, self.mode = self.mode, None
        if mode == "boom":
            raise ValueError("index exploded\nsecond line")
        if mode in ("dead", "silent"):  # what a store set's Ray shard raises when its actors died / are silent
            raise UnavailableError(f"shard s0: {mode}", 503 if mode == "dead" else 504)
        if mode == "slow":
            time.sleep(0.6)
        return self.ds.search_rows(*a, **kw)


def test_internal_error_and_timeout_are_json_and_the_server_goes_on(store):
    _, _, ds = store
    bad = Misbehaving(ds)

    async def run() -> list[httpx.Response]:
        app = create_app({"ds": bad}, ServeConfig(timeout_s=0.3))
        out = []
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for mode in ("boom", "slow", "dead", "silent", None):
                bad.mode = mode
                out.append(await client.post("/search", json={"queries": ["river"], "k": 2}))
                await asyncio.sleep(0.5 if mode == "slow" else 0)  # the slow search ends before the next
        return out

    boom, slow, dead, silent, fine = asyncio.run(run())
    assert boom.status_code == 500 and boom.json() == {"error": "internal error: ValueError: index exploded"}
    assert slow.status_code == 504 and "--timeout-s" in slow.json()["error"]
    assert (dead.status_code, dead.json()) == (503, {"error": "shard s0: dead"})  # not the client's fault: 5xx
    assert (silent.status_code, silent.json()) == (504, {"error": "shard s0: silent"})
    assert fine.status_code == 200 and fine.json()["ids"] == ds.search_rows(["river"], 2)[1].tolist()


def test_serve_command_starts_answers_and_stops(store, tmp_path):
    """`ralm serve DS --port N --token-file F` as a user starts it, stopped by SIGTERM to its own pid."""
    path, _, ds = store
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ralm.cli", "serve", str(path), "--port", str(port),
                             "--token-file", str(tmp_path / "token")], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        r = post(url, {"queries": ["river mountain"], "k": 3})
        assert r.status_code == 200 and r.json()["ids"] == ds.search_rows(["river mountain"], 3)[1].tolist()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert f"serving ds ({len(ds):,} rows) at {url}" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_knn_lm_refuses_a_served_store(store, served, tiny_lm):
    from ralm.eval.runner import EvalLMConfig, run_eval_lm

    _, held, _ = store
    with pytest.raises(RalmError, match="serves retrieval stores, not kNN-LM stores"):
        run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], method="knn-lm", datastore=served.url),
                    progress=False)


def test_search_and_info_commands_take_a_url(store, served, monkeypatch):
    path, _, _ = store
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    runner = CliRunner()
    here, there = (runner.invoke(cli_app, ["search", where, "river mountain", "--k", "3", "--json"])
                   for where in (str(path), served.url))
    assert here.exit_code == there.exit_code == 0 and json.loads(here.stdout) == json.loads(there.stdout)
    info = runner.invoke(cli_app, ["info", served.url, "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["url"] == served.url
    verify = runner.invoke(cli_app, ["info", served.url, "--verify"])
    assert verify.exit_code == 2 and "--verify: checks a store's own files" in verify.stderr
