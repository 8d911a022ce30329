"""The method registry: the one seam every scoring method goes through (issue 12).

A method is one module under ``ralm.methods`` that ends with ``register_method(Method(...))``. The runner,
``ralm scale``, ``ralm generate`` and the CLI look methods up here by name and never compare names
themselves, so a new method is one new module (plus its line in ``ralm/methods/__init__.py``). Importing
``ralm.methods`` registers the built-in ones (this module sits below them and cannot import them).

A method's options are its ``config`` dataclass, declared once with their help: ``ralm eval-lm`` and ``ralm
scale`` build their flags by walking the registry (``option_configs``), so a new method's options reach the
command line by registering it. A run config keeps them in ``options[Method.options]``; ``check_options``
refuses the options of a method that does not run.

Life of a method in ``ralm eval-lm``: ``resolve(run config, its options)`` (fill defaults, refuse what it cannot use;
before any model is loaded) -> ``open(MethodContext) -> Session`` -> the evaluator calls ``session.scorer``
on every document -> ``session.extras()`` -> ``session.close()`` (always, in ``finally``: removes hooks, so
a reused model is left as it came; knn-transformers' break_into / break_out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ralm.core.neighbours import NeighbourLog
from ralm.core.retriever import Retriever
from ralm.errors import RalmError

STORE_KINDS = ("none", "retrieval", "knn", "examples")


@dataclass
class MethodContext:
    """What a method may use when it opens: the loaded model, its run options and the shared settings."""

    model: Any
    tokenizer: Any
    model_name: str
    store: str | None  # the store folder (kind given by ``Method.store``), None for none / retrieval off
    options: Any  # the method's own options (an instance of ``Method.config``), or None
    lm: Any  # the ``LMEvalConfig`` (context, window stride, max docs)
    run: Any = None  # the whole run config
    docs: list[Any] = field(default_factory=list)  # the evaluated documents (decontamination reads their tokens)
    exclude_same_doc: bool = True
    decontaminate: int | None = None
    subset: float | None = None
    subset_seed: int = 0
    leakage: bool = False  # record NeighbourLogs for the leakage report
    validation: list[Any] | None = None  # the documents of the options' ``validation`` files, already read
    progress: bool = True
    # applied by every method to the retriever it opens (ralm.core.retriever): changes what every method retrieves
    wrap_retriever: Callable[[Retriever], Retriever] | None = None

    def wrapped(self, retriever: Retriever) -> Retriever:
        return self.wrap_retriever(retriever) if self.wrap_retriever is not None else retriever


@dataclass
class Session:
    """An opened method. ``scorer``: (targets, context) -> (NLL per target, retrieval seconds); None = plain LM.

    ``window_stride``: the stride it really scores with (None: the plain LM's windows). ``logs``: doc id ->
    NeighbourLog (filled while scoring when ``MethodContext.leakage``). ``info``: extras known when opened;
    ``after``: extras only known after the evaluation (e.g. the kNN-LM's λ sweep); ``on_close``: teardown.
    """

    scorer: Callable[[Any, int], Any] | None = None
    window_stride: int | None = None
    logs: dict[str, NeighbourLog] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], dict[str, Any]] | None = None
    on_close: Callable[[], None] | None = None

    def log_for(self, doc_id: str, on: bool) -> NeighbourLog | None:
        """This document's log when the leakage report is on, else None."""
        return self.logs.setdefault(doc_id, NeighbourLog()) if on else None

    def extras(self) -> dict[str, Any]:
        return {**self.info, **(self.after() if self.after is not None else {})}

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()
            self.on_close = None  # closing twice is harmless


@dataclass(frozen=True)
class Method:
    """One scoring method.

    ``config``: its options dataclass (help in ``field(metadata={"help": ...})``, validated in its own
    ``__post_init__``; a ``validation`` field of files is read by the runner into ``MethodContext.validation``);
    ``options``: its key in the run config's ``options`` dict (methods may share one, as in-context and REPLUG
    do); ``owns``: fields of a flat run config (``GenerateConfig``) only this method reads (e.g.
    ``checkpoint``), refused for any other method; ``resolve(run, options)``: fills defaults / refuses bad
    combinations before a model is loaded (default: a method with a store needs ``--datastore``);
    ``generate(model, tok, cfg, ds, state)``: a step function for ``ralm generate`` (None: the method cannot
    generate); ``report``: result keys that ``ralm scale`` keeps per point.
    """

    name: str
    help: str
    store: str
    open: Callable[[MethodContext], Session]
    config: type | None = None
    options: str | None = None
    owns: tuple[str, ...] = ()
    resolve: Callable[[Any], None] | None = None
    generate: Callable[..., Any] | None = None
    load_generation: Callable[..., Any] | None = None
    report: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.store not in STORE_KINDS:
            raise ValueError(f"method {self.name!r}: store kind {self.store!r} is not one of {STORE_KINDS}")
        if (self.options is None) != (self.config is None):
            raise ValueError(f"method {self.name!r}: config and options go together")

    def options_of(self, run: Any) -> Any:
        """This method's options in a run config's ``options`` dict (None for a method without options)."""
        return run.options[self.options] if self.options else None

    def prepare(self, run: Any, options: Any) -> None:
        """Before any model loads: the method's ``resolve``, or by default refuse a store method without a store."""
        if self.resolve is not None:
            self.resolve(run, options)
        elif self.store != "none" and not run.datastore:
            raise RalmError(f"--method {self.name} needs --datastore")


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method``; a second method of the same name is refused (two modules claiming one name is a bug), and
    so is an options key another method holds with another config."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    for other in _METHODS.values():
        if method.options and other.options == method.options and other.config is not method.config:
            raise ValueError(f"method {method.name!r}: options {method.options!r} are {other.name!r}'s "
                             f"{other.config.__name__}, not {method.config.__name__}")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (tests register toy methods and take them out again)."""
    _METHODS.pop(name, None)


def method_names(store: str | None = None, generates: bool = False) -> tuple[str, ...]:
    """Registered names in registration order; ``store``: only methods reading that kind of store
    ("any": every kind but none); ``generates``: only methods ``ralm generate`` can run."""
    return tuple(n for n, m in _METHODS.items()
                 if (store is None or m.store == store or (store == "any" and m.store != "none"))
                 and (not generates or m.generate is not None))


def get_method(name: str, flag: str = "--method", generates: bool = False) -> Method:
    """The method called ``name``; an unknown one is one error listing the registered names."""
    names = method_names(generates=generates)
    if name not in names:
        raise RalmError(f"{flag} {name!r}: expected one of {', '.join(names)}")
    return _METHODS[name]



def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``metadata["flag"]`` or ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_configs() -> dict[str, tuple[type, tuple[str, ...]]]:
    """Options key -> (its config dataclass, the methods reading it), in registration order."""
    out: dict[str, tuple[type, tuple[str, ...]]] = {}
    for name, m in _METHODS.items():
        if m.options:
            cfg, names = out.get(m.options, (m.config, ()))
            out[m.options] = (cfg, (*names, name))
    return out


def check_options(options: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``options`` with every registered key filled with its default; an option that differs from its default
    but belongs to none of the methods ``names`` is refused naming its flag (``--k is for --method knn-lm,
    not none``); an unknown key or an instance of the wrong config is a programming error."""
    known = option_configs()
    if unknown := sorted(set(options) - set(known)):
        raise ValueError(f"options {unknown}: no registered method reads them (known: {', '.join(known)})")
    full: dict[str, Any] = {}
    for key, (cfg, owners) in known.items():
        default = cfg()
        value = options.get(key, default)
        if not isinstance(value, cfg):
            raise TypeError(f"options[{key!r}]: expected a {cfg.__name__}, got {type(value).__name__}")
        if not set(owners) & set(names):
            for f in dataclasses.fields(cfg):
                if f.init and getattr(value, f.name) != getattr(default, f.name):
                    raise RalmError(f"{flag_of(f)} is for --method {' or '.join(owners)}, not {', '.join(names)}")
        full[key] = value
    return full


def refuse_foreign(cfg: Any, name: str) -> None:
    """Refuse a run option that another method owns (``Method.owns``), e.g. a checkpoint for the plain LM."""
    own = get_method(name).owns
    for other, m in _METHODS.items():
        for f in m.owns:
            if f not in own and getattr(cfg, f, None):
                raise RalmError(f"--{f.replace('_', '-')} is for --method {other}, not {name}")
