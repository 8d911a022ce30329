#!/usr/bin/env python
"""The quick-start demo (``make demo``): where retrieval helps the default LM (SmolLM2-135M), where it does
not, and why, measured in a few minutes on CPU.

1. Open-book vs closed-book QA (SQuAD v1.1 dev): a store of the paragraphs of a few dev articles; the LM
   answers sampled questions from its weights alone, then with the top-1 retrieved paragraph in the prompt.
   One question is printed with its retrieved paragraph and both answers.
2. Language modelling on BBC News articles that are in the stores, two ways: the leakage setting (the
   evaluated article itself may be retrieved: same-document exclusion off) and the clean setting (the article
   and every neighbour sharing a 32-token span with it excluded), for In-Context RALM (retrieval store of
   64-token chunks + continuations) and kNN-LM (a store of the LM's hidden states; λ and temperature chosen on
   held-out validation articles in the clean setting), against the LM without retrieval on the same tokens;
   then in-context RALM on articles of a topic no store holds.

Every number is measured in the run and printed with its one-line meaning; the closing table, JSON and a PNG
chart go to ``--out``. The workloads are sized down from ``benchmarks/qa.py`` and ``benchmarks/lm.py`` to fit
the budget (the output says how). Reruns reuse the finished stores. Data: ``$RALM_DATA_DIR`` (``make demo``
points it at ../shared/data when there) or ``ralm data get``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from demo_report import Row, change, pct, table, write_all

MODEL = "smollm2-135m"
TIMES: dict[str, float] = {}


@contextmanager
def timed(stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMES[stage] = round(time.perf_counter() - t0, 1)
        log(f"{stage}: {TIMES[stage]:.0f} s")


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_once(path: Path, text: str) -> Path:
    """Write ``path`` whole unless it exists (a rerun keeps the same splits, so its stores stay valid)."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def set_threads(requested: int) -> str:
    """torch CPU threads. 0 = auto: no more threads than cores left idle by other jobs (at least one;
    oversubscribed threads ran this demo's QA ~5x slower on a loaded 2-core machine)."""
    import torch

    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    torch.set_num_threads(requested or max(1, min(torch.get_num_threads(), round(cores - load))))
    return f"{torch.get_num_threads()} torch thread(s), load average {load:.1f} on {cores} cores"


# ---- 1. open-book vs closed-book QA ---------------------------------------------------------------------
def squad_subset(squad: Path, out: Path, n_articles: int) -> tuple[Path, dict]:
    """``n_articles`` dev articles evenly spaced over the file (all their paragraphs and questions)."""
    data = json.loads(squad.read_text(encoding="utf-8"))
    arts = data["data"]
    step = max(1, len(arts) // n_articles)
    chosen = arts[::step][:n_articles]
    sub = write_once(out / f"squad-{n_articles}-articles.json", json.dumps({"version": data.get("version"),
                                                                            "data": chosen}))
    return sub, {"articles": [a["title"] for a in chosen], "file_articles": len(arts),
                 "file_paragraphs": sum(len(a["paragraphs"]) for a in arts),
                 "file_questions": sum(len(p["qas"]) for a in arts for p in a["paragraphs"])}


def qa_stage(squad: Path, out: Path, args: argparse.Namespace) -> tuple[list[Row], dict]:
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.store import Datastore
    from ralm.eval.qa import EvalQAConfig, run_eval_qa, squad_f1

    sub, info = squad_subset(squad, out, args.squad_articles)
    store = out / "squad-ds"
    with timed("QA store"):  # one passage per paragraph: SQuAD paragraphs fit in 256 tokens
        s = build(BuildConfig(inputs=[str(sub)], out=str(store), tokenizer=MODEL,
                              chunking=ChunkingConfig(chunk_tokens=256, continuation=False)))
    log(f"QA store {store}: {s['documents']} paragraphs of {len(info['articles'])} articles, {s['chunks']} passages")
    with timed("QA closed + open book"):
        r = run_eval_qa(EvalQAConfig(data=str(sub), model=MODEL, datastore=str(store), docs=1,
                                     limit=args.questions, seed=0, examples=args.questions), progress=False)
    ex = r["examples"]
    hit = [e for e in ex if e["gold_in_top_k"]]
    miss = [e for e in ex if not e["gold_in_top_k"]]

    def f1(group: list[dict], mode: str) -> float | None:
        return 100 * sum(squad_f1(e[mode], e["answers"]) for e in group) / len(group) if group else None

    closed, opened = r["closed_book"]["f1"], r["open_book"]["f1"]
    n = r["n"]
    rows = [Row("qa", "closed book", "F1", closed, "the LM answers from its weights alone", n),
            Row("qa", "open book (top-1 retrieved paragraph in the prompt)", "F1", opened,
                f"retrieval {change(opened, closed, False, 'points')}: the model can copy the answer from the "
                "passage in its prompt", n),
            Row("qa", "retriever: gold paragraph is the top hit", "recall@1", r["recall_at_k"],
                f"of {s['chunks']} passages; open book can only copy the answer on these questions", n)]
    if miss:
        rows.append(Row("qa", "open book, top hit is the wrong paragraph", "F1", f1(miss, "open_book"),
                        f"closed book scores {f1(miss, 'closed_book'):.2f} on these; a wrong passage: "
                        f"{change(f1(miss, 'open_book'), f1(miss, 'closed_book'), False, 'points')}", len(miss)))
    # the question shown: the first of the sample that retrieval improved (else the first); the counts say
    # how often it improved and how often it worsened an answer, so the example is not the whole story
    better = [e for e in ex if squad_f1(e["open_book"], e["answers"]) > squad_f1(e["closed_book"], e["answers"])]
    worse = [e for e in ex if squad_f1(e["open_book"], e["answers"]) < squad_f1(e["closed_book"], e["answers"])]
    shown = (better or ex)[0]
    passage = Datastore.open(store).search([shown["question"]], k=1)[0][0]
    detail = {"data": str(sub), **info, "store": str(store), "paragraphs": s["documents"], "passages": s["chunks"],
              "questions": n, "seed": 0, "f1": {"closed": closed, "open": opened},
              "em": {"closed": r["closed_book"]["em"], "open": r["open_book"]["em"]},
              "f1_gold_retrieved": {"n": len(hit), "closed": f1(hit, "closed_book"), "open": f1(hit, "open_book")},
              "f1_gold_missed": {"n": len(miss), "closed": f1(miss, "closed_book"), "open": f1(miss, "open_book")},
              "improved": len(better), "worsened": len(worse), "shown": {**shown, "passage": passage.text},
              "seconds": r["seconds"]}
    return rows, detail


def print_question(d: dict) -> None:
    e = d["shown"]
    print(f"\nRetrieval raised the answer's F1 on {d['improved']} of {d['questions']} questions and lowered it on "
          f"{d['worsened']}. The first it raised:")
    print(f"  Q: {e['question']}")
    print(f"  gold answer(s): {' | '.join(e['answers'])}")
    print(f"  retrieved paragraph {e['retrieved'][0]} ({'the gold one' if e['gold_in_top_k'] else 'not the gold one'}): "
          f"{_clip(e['passage'], 400)}")
    print(f"  closed book: {e['closed_book']!r}   (F1 {_f1(e, 'closed_book'):.0f})")
    print(f"  open book:   {e['open_book']!r}   (F1 {_f1(e, 'open_book'):.0f})")


def _f1(e: dict, mode: str) -> float:
    from ralm.eval.qa import squad_f1

    return 100 * squad_f1(e[mode], e["answers"])


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ---- 2. language modelling: leakage vs clean ------------------------------------------------------------
def bbc_splits(bbc: Path, out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Store articles from the start of the file (which is sorted by topic: business first), given explicit
    ids so that an evaluated article has the same id as its copy in the stores (same-document exclusion goes
    by id); evaluated: the first mid-length articles of the kNN-LM store (so both stores hold them);
    validation (kNN-LM's λ): the next mid-length articles after the kNN-LM store, the same topic, not in it;
    other: mid-length articles from the end of the file (tech), a topic no store holds."""
    lines = bbc.read_text(encoding="utf-8").splitlines()
    recs = [{"id": f"bbc-{i}", "text": json.loads(line)["text"]} for i, line in enumerate(lines)]

    def mid(rs: list[dict]) -> list[dict]:
        return [r for r in rs if 1500 <= len(r["text"]) <= 2500]

    parts = {"store": recs[:args.store_docs], "knn": recs[:args.knn_docs],
             "eval": mid(recs[:args.knn_docs])[:args.eval_docs], "valid": mid(recs[args.knn_docs:])[:args.eval_docs],
             "other": mid(recs[max(args.store_docs, len(recs) - 400):])[:args.eval_docs]}
    return {k: write_once(out / f"bbc-{k}-{len(v)}.jsonl", "".join(json.dumps(r) + "\n" for r in v))
            for k, v in parts.items()}


def lm_stage(bbc: Path, out: Path, args: argparse.Namespace, lm: Any) -> tuple[list[Row], dict]:
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.index import IndexConfig
    from ralm.errors import IncompatibleError
    from ralm.methods.knnlm import open_knn_store
    from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

    files = bbc_splits(bbc, out, args)
    ds, knn = out / f"bbc-ds-{args.store_docs}", out / f"bbc-knn-{args.knn_docs}-{args.context}"
    with timed("BBC retrieval store"):
        s = build(BuildConfig(inputs=[str(files["store"])], out=str(ds), shard_docs=100))
    with timed("BBC kNN-LM store"):
        # windows that do not overlap: half the forward passes of eval-lm's default (as benchmarks/lm.py)
        kcfg = KNNBuildConfig([str(files["knn"])], str(knn), model=MODEL, context=args.context,
                              window_stride=args.context, index=IndexConfig("flat", metric="l2"))
        k = build_knn_store(kcfg)
        try:  # a finished store is reused as it is; keys of another model (or conversion) would be refused later
            open_knn_store(str(knn), MODEL, lm.model, lm.tokenizer)
        except IncompatibleError as e:
            log(f"{e}: rebuilding it")
            k = build_knn_store(replace(kcfg, force=True))
    log(f"retrieval store {ds}: {s['documents']} articles, {s['chunks']:,} chunks; "
        f"kNN-LM store {knn}: {k['keys']:,} keys")
    ev = _evaluator(files, args, lm)
    with timed("LM: no retrieval"):
        none = ev("none", None)
    with timed("LM: in-context RALM, leakage + clean"):
        ic_leak = ev("in-context", ds, exclude_same_doc=False)
        ic_clean = ev("in-context", ds, decontaminate=32)
    with timed("LM: other topic, no retrieval + in-context RALM"):
        other_none = ev("none", None, data=files["other"])
        other_ic = ev("in-context", ds, data=files["other"], decontaminate=32)
    with timed("LM: kNN-LM, leakage + clean"):
        kn_leak = ev("knn-lm", knn, exclude_same_doc=False)
        kn_clean = ev("knn-lm", knn, decontaminate=32, validation=[str(files["valid"])])
    base, n = none["ppl"], none["tokens"]
    assert all(r["tokens"] == n for r in (ic_leak, ic_clean, kn_leak, kn_clean))  # the same scored tokens
    leak_note = "the article itself is in the store and may be retrieved"
    clean_note = "its own article and any neighbour sharing a 32-token span are excluded"
    rows = [Row("lm", "no retrieval", "perplexity", base, f"SmolLM2-135M alone, context {args.context}", n),
            Row("lm", "in-context RALM, leakage", "perplexity", ic_leak["ppl"],
                f"{pct(ic_leak['ppl'], base)}: {leak_note}; it reads the article's own next sentences "
                "(proves the wiring; not a real gain)", n),
            Row("lm", "in-context RALM, clean", "perplexity", ic_clean["ppl"],
                f"{change(ic_clean['ppl'], base, True)}: {clean_note}; the passage is another article", n),
            Row("lm", "kNN-LM, leakage", "perplexity", kn_leak["ppl"],
                f"{pct(kn_leak['ppl'], base)}: {leak_note}; its exact next tokens are stored "
                f"(λ {kn_leak['lmbda']}, default)", n),
            Row("lm", "kNN-LM, clean", "perplexity", kn_clean["ppl"],
                f"{change(kn_clean['ppl'], base, True)}: {clean_note}; λ {kn_clean['lmbda']}, T "
                f"{kn_clean['temperature']} chosen on {args.eval_docs} held-out articles", n),
            Row("lm", "other topic: no retrieval", "perplexity", other_none["ppl"],
                f"{args.eval_docs} tech articles, in no store (which holds business news)", other_none["tokens"]),
            Row("lm", "other topic: in-context RALM, clean", "perplexity", other_ic["ppl"],
                f"{change(other_ic['ppl'], other_none['ppl'], True)}: the passages are business news, "
                "not on the topic", other_ic["tokens"])]
    keep = ("ppl", "bpb", "tokens", "bytes", "seconds", "tokens_per_second", "lmbda", "temperature", "k",
            "exclude_same_doc", "decontaminate", "lmbda_sweep_validation", "lmbda_sweep_test")
    detail = {"files": {k: str(v) for k, v in files.items()}, "retrieval_store": {"path": str(ds), **{
        x: s[x] for x in ("documents", "chunks")}}, "knn_store": {"path": str(knn), "keys": k["keys"]},
        "context": args.context, "stride": args.stride, "neighbour": _neighbours(ds, files["eval"], args.stride),
        "runs": {name: {x: r[x] for x in keep if x in r} for name, r in
                 (("none", none), ("in-context leakage", ic_leak), ("in-context clean", ic_clean),
                  ("knn-lm leakage", kn_leak), ("knn-lm clean", kn_clean), ("other topic none", other_none),
                  ("other topic in-context clean", other_ic))}}
    return rows, detail


def _evaluator(files: dict[str, Path], args: argparse.Namespace, lm: Any) -> Callable[..., dict]:
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig, run_eval_lm
    from ralm.methods.in_context import InContextConfig
    from ralm.methods.knnlm import KNNLMConfig

    def ev(method: str, store: Path | None, data: Path = files["eval"], **kw: Any) -> dict:
        # each method's own options only: another method's are refused
        options = {"in-context": {"in_context": InContextConfig(stride=args.stride)},
                   "knn-lm": {"knn": KNNLMConfig(validation=kw.pop("validation", None))}}.get(method, {})
        cfg = EvalLMConfig(model=MODEL, data=[str(data)], method=method,
                           datastore=str(store) if store else None, lm=LMEvalConfig(context=args.context),
                           options=options, **kw)
        r = run_eval_lm(cfg, progress=False, loaded=lm)
        log(f"{method} on {data.name} {kw or ''}: ppl {r['ppl']:.2f} ({r['tokens']} tokens, {r['tokens_per_second']} tok/s)")
        return r

    return ev


def _neighbours(ds: Path, eval_file: Path, stride: int) -> dict:
    """What in-context RALM's query finds at each block of the first evaluated article, exclusion off and on:
    how often the top passage is the article itself, and the first block where it is."""
    from ralm import Datastore
    from ralm.lm.presets import load_tokenizer

    doc = json.loads(eval_file.read_text(encoding="utf-8").splitlines()[0])
    tok = load_tokenizer(MODEL)
    ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
    starts = list(range(stride, len(ids), stride))
    queries = [tok.decode(ids[max(0, at - 32):at]) for at in starts]
    store = Datastore.open(ds)
    leak = [h[0] for h in store.search(queries, k=1)]
    clean = [h[0] for h in store.search(queries, k=1, exclude_doc_ids={doc["id"]})]
    own = [i for i, h in enumerate(leak) if h.doc_id == doc["id"]]
    i = own[0] if own else 0
    return {"doc": doc["id"], "blocks": len(starts), "own_article_top": len(own), "position": starts[i],
            "query": queries[i], "next": tok.decode(ids[starts[i]:starts[i] + 32]),
            **{name: {"doc": h[i].doc_id, "text": h[i].text, "continuation": h[i].continuation}
               for name, h in (("leakage", leak), ("clean", clean))}}


def print_neighbours(n: dict) -> None:
    print(f"\nIn-context RALM's query (the 32 tokens before a block) on {n['doc']}: with exclusion off the top passage "
          f"is the article itself at {n['own_article_top']} of {n['blocks']} blocks. Before token {n['position']}:")
    print(f"  query: {_clip(n['query'], 200)!r}")
    print(f"  the article goes on: {_clip(n['next'], 160)!r}")
    for name in ("leakage", "clean"):
        h = n[name]
        print(f"  {name:8s} top passage from {h['doc']}: {_clip(h['text'], 100)!r} -> continuation "
              f"{_clip(h['continuation'], 120)!r}")


# ---- main -----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="folder for the data splits, the stores and the results")
    ap.add_argument("--squad-articles", type=int, default=4, help="SQuAD dev articles in the QA store (of 48)")
    ap.add_argument("--questions", type=int, default=32, help="questions sampled from those articles (fixed seed)")
    ap.add_argument("--store-docs", type=int, default=150, help="BBC articles in the retrieval store")
    ap.add_argument("--knn-docs", type=int, default=20, help="BBC articles in the kNN-LM store (one key per token)")
    ap.add_argument("--eval-docs", type=int, default=2, help="BBC articles evaluated (and validation articles)")
    ap.add_argument("--context", type=int, default=256, help="LM context for every LM method")
    ap.add_argument("--stride", type=int, default=32, help="In-Context RALM: tokens scored between retrievals")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto, see set_threads)")
    args = ap.parse_args()

    from ralm import RalmError
    from ralm.data import registry
    from ralm.lm.models import load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads = set_threads(args.threads)
    log(threads)
    try:
        with timed("data"):
            squad = registry.get("squad-dev", log=log)
            bbc = registry.get("bbc-news", log=log)
        with timed("load LM (converts the GGUF on first use)"):
            lm = load(MODEL)
        qa_rows, qa = qa_stage(squad, out, args)
        lm_rows, lmd = lm_stage(bbc, out, args, lm)
    except RalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = qa_rows + lm_rows
    summary = _summary(rows, qa, lmd)
    total = round(time.perf_counter() - t_start, 1)
    print_question(qa)
    print_neighbours(lmd["neighbour"])
    print(f"\nSized down to fit a few minutes on CPU: QA on {qa['questions']} questions sampled from "
          f"{len(qa['articles'])} of {qa['file_articles']} SQuAD dev articles (store of {qa['paragraphs']} of "
          f"{qa['file_paragraphs']} paragraphs; benchmarks/qa.py: 500 questions, all paragraphs); LM on "
          f"{args.eval_docs} BBC articles ({lm_rows[0].n:,} tokens), context {args.context}, stores of "
          f"{args.store_docs} and {args.knn_docs} articles (benchmarks/lm.py: Wikipedia, context 512, 460 articles, "
          ">1M kNN keys). Small samples: differences of a few points or percent are within noise.")
    print(f"\nSmolLM2-135M; {threads}\n")
    print(table(rows))
    print()
    for s in summary:
        print(f"- {s}")
    details = {"qa": qa, "lm": lmd, "stage_seconds": TIMES, "total_seconds": total, "threads": threads,
               "args": vars(args)}
    paths = write_all(out, rows, summary, _panels(qa, lmd), details)
    print(f"\nstage times (s): {', '.join(f'{k} {v:.0f}' for k, v in TIMES.items())}; {total:.0f} s in all")
    print(f"results: {paths['md']}, {paths['json']}, chart {paths['png']}")


def _summary(rows: list[Row], qa: dict, lm: dict) -> list[str]:
    """Where retrieval helps and where not, read off the measured rows."""
    by = {r.setting: r for r in rows}
    closed, opened = by["closed book"].value, by["open book (top-1 retrieved paragraph in the prompt)"].value
    hit, miss = qa["f1_gold_retrieved"], qa["f1_gold_missed"]
    out = [f"QA: open book {'beats' if opened > closed else 'does not beat'} closed book ({opened - closed:+.1f} F1 "
           f"points). On the {hit['n']} questions whose gold paragraph was retrieved: open {_num(hit['open'])} vs "
           f"closed {_num(hit['closed'])}; on the {miss['n']} others: open {_num(miss['open'])} vs closed "
           f"{_num(miss['closed'])}."]
    base = by["no retrieval"].value
    cut = {m: 100 * (1 - by[f"{m}, leakage"].value / base) for m in ("in-context RALM", "kNN-LM")}
    out.append(f"LM, leakage: in-context RALM cuts perplexity by {cut['in-context RALM']:.0f}% and kNN-LM by "
               f"{cut['kNN-LM']:.0f}% when the evaluated article is in the store: the retrieval is wired right and "
               "used, but this is copying, not a gain a user would see.")
    verdicts = [f"{m} {change(by[f'{m}, clean'].value, base, True)}" for m in ("in-context RALM", "kNN-LM")]
    line = f"LM, clean (own article and 32-token overlaps excluded): {'; '.join(verdicts)}."
    if lm["runs"]["knn-lm clean"].get("lmbda") == 0:
        line += " kNN-LM's λ chosen on the validation articles is 0: they gained nothing from its store, so it is off."
    n = lm["neighbour"]
    line += (f" In-context RALM's passages then come from other articles (e.g. {n['clean']['doc']} for "
             f"{n['doc']}); they help only as far as they cover the same story.")
    out.append(line)
    other, other_base = by["other topic: in-context RALM, clean"].value, by["other topic: no retrieval"].value
    line = f"LM, a topic the store does not cover: in-context RALM {change(other, other_base, True)}"
    if other > other_base * 1.005:
        line += ": a passage on another subject only takes room in the context"
    out.append(line + ".")
    return out


def _panels(qa: dict, lm: dict) -> list:
    """The chart: SQuAD F1 closed vs open book (all questions, gold paragraph retrieved or not); BBC perplexity
    without retrieval, leaked and clean."""
    runs = {k: v["ppl"] for k, v in lm["runs"].items()}
    hit, miss = qa["f1_gold_retrieved"], qa["f1_gold_missed"]
    qa_groups = [(f"all {qa['questions']}", [("closed book", qa["f1"]["closed"]), ("open book", qa["f1"]["open"])])]
    qa_groups += [(f"{name} ({g['n']})", [("closed book", g["closed"]), ("open book", g["open"])])
                  for name, g in (("gold paragraph\nretrieved", hit), ("wrong paragraph\nretrieved", miss)) if g["n"]]
    lm_groups = [("in-context RALM", [("no retrieval", runs["none"]), ("leakage", runs["in-context leakage"]),
                                      ("clean", runs["in-context clean"])]),
                 ("kNN-LM", [("no retrieval", runs["none"]), ("leakage", runs["knn-lm leakage"]),
                             ("clean", runs["knn-lm clean"])]),
                 ("in-context RALM,\nother topic", [("no retrieval", runs["other topic none"]),
                                                    ("clean", runs["other topic in-context clean"])])]
    return [("SQuAD dev: answer F1 (higher is better)", "F1 (points)", qa_groups),
            ("BBC News: perplexity (lower is better)", "perplexity", lm_groups)]


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
