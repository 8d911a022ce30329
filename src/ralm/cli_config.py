"""CLI options generated from config dataclasses: each option is declared once, with its help, in its config.

``config_command(app, "build", spec)`` registers a command whose flags come from the dataclass ``spec()``
returns: for each field ``--field-name`` (``metadata["flag"]`` renames it, ``metadata["short"]`` adds e.g.
``-o``), its help from ``metadata["help"]`` (a field without help is refused), its default from the config.
``bool``: ``--x/--no-x``, or one ``--x`` switch when it defaults to False (``metadata["switch"]`` decides
otherwise); ``list[str]``: repeatable; tuples/lists of numbers: one comma-separated string; ``X | None``:
optional. Nested dataclass fields are flattened; ``Spec.dicts`` turns a ``dict[str, config]`` field into the
flags of each config (the method options of ``eval-lm``, from the registry). ``metadata["cli"] = False``
keeps a field off the command line.

Typer reads a command's ``inspect.signature``: the generated one is the body's own parameters (positional
arguments and CLI-only flags such as ``--json``) plus one keyword per option; on call the body receives
``config``, a function that converts the parsed values and rebuilds the (nested) config, raising RalmError
(one line naming the flag) on a bad value. The options are generated when the command runs or shows its help
(``LazyCommand``), not when ``ralm`` starts: the configs live in modules that load torch, which ``ralm
--help`` or ``ralm info`` must not wait for; it also means a method registered after import gets its flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import click
import typer
import typer.main
from typer.core import TyperCommand
from typer.models import ArgumentInfo, OptionInfo

from ralm.core.registry import flag_of
from ralm.errors import RalmError

REQUIRED = inspect.Parameter.empty
_NUMBERS = {int: "integers", float: "numbers", str: "values"}


@dataclass(frozen=True)
class Spec:
    """What a command's options are generated from.

    ``skip``: dotted field paths the body declares itself or fills (e.g. ``inputs``, ``eval.method``);
    ``dicts``: dotted path of a ``dict[str, config]`` field -> {key: (config class, help prefix)}.
    """

    config: type
    skip: tuple[str, ...] = ()
    dicts: dict[str, dict[str, tuple[type, str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One generated flag: where its value goes in the config tree and how the parsed value converts."""

    path: tuple[str, ...]
    owner: str  # "LMEvalConfig.window_stride": named when two declarations collide
    decls: tuple[str, ...]
    annotation: Any
    default: Any  # what typer shows and passes when the flag is absent (REQUIRED: a required option)
    help: str
    convert: Callable[[Any], Any]

    @property
    def param(self) -> str:
        return self.decls[0].split("/")[0].lstrip("-").replace("-", "_")

    @property
    def flags(self) -> list[str]:
        return [f for d in self.decls for f in d.split("/")]


def _default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _unoptional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    args = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _csv(flag: str, elem: type, container: type, default: Any) -> Callable[[Any], Any]:
    def convert(text: str | None) -> Any:
        if text is None:
            return default
        try:
            return container(elem(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise RalmError(f"{flag} {text!r}: expected comma-separated {_NUMBERS[elem]}") from None

    return convert


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _option(cls: type, f: dataclasses.Field, tp: Any, default: Any, path: tuple[str, ...], prefix: str) -> Option:
    owner = f"{cls.__name__}.{f.name}"
    help_text = f.metadata.get("help")
    if not help_text:
        raise TypeError(f"{owner}: no help; declare it as field(metadata={{'help': ...}}) or keep it off the CLI "
                        "with metadata={'cli': False}")
    flag = flag_of(f)
    short = (f.metadata["short"],) if "short" in f.metadata else ()
    help_text = f"{prefix}: {help_text}" if prefix else help_text
    inner, optional = _unoptional(tp)
    origin, args = get_origin(inner), get_args(inner)

    def opt(decls: tuple[str, ...], annotation: Any, shown: Any, convert: Callable[[Any], Any]) -> Option:
        return Option(path, owner, decls + short, annotation, shown, help_text, convert)

    if inner is bool:
        switch = f.metadata.get("switch", default is False)
        return opt((flag,) if switch else (f"{flag}/--no-{flag[2:]}",), tp, default, lambda v: v)
    if inner in (int, float, str):
        return opt((flag,), tp, default, lambda v: v)
    if origin is list and args == (str,):  # repeatable; given none: the field's default
        if default is REQUIRED:
            return opt((flag,), list[str], REQUIRED, list)
        return opt((flag,), list[str] | None, None, lambda v: list(v) if v else default)
    elem = args[0] if args else None
    if origin in (list, tuple) and elem in _NUMBERS and (origin is list or args[1:] in ((), (Ellipsis,))):
        shown = ",".join(map(_fmt, default)) if default not in (None, REQUIRED) and len(default) else None
        return opt((flag,), str | None, shown, _csv(flag, elem, origin, None if default is REQUIRED else default))
    raise TypeError(f"{owner}: type {tp} has no command-line form")


def options(spec: Spec) -> list[Option]:
    """The flags of ``spec``'s config, in field order (nested configs flattened where they stand)."""

    def walk(cls: type, base: Any, path: tuple[str, ...], prefix: str = "") -> list[Option]:
        out: list[Option] = []
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = ".".join(path + (f.name,))
            if not f.init or f.metadata.get("cli") is False or dotted in spec.skip:
                continue
            if dotted in spec.dicts:
                for key, (sub, pre) in spec.dicts[dotted].items():
                    out += walk(sub, sub(), path + (f.name, key), pre)
                continue
            default = _default(f, base)
            if dataclasses.is_dataclass(hints[f.name]):
                out += walk(hints[f.name], None if default is REQUIRED else default, path + (f.name,), prefix)
            else:
                out.append(_option(cls, f, hints[f.name], default, path + (f.name,), prefix))
        return out

    return walk(spec.config, None, ())


def assemble(spec: Spec, values: dict[tuple[str, ...], Any], fixed: dict[str, Any]) -> Any:
    """The config of ``spec`` from converted option values (by path) and ``fixed`` ones (dotted path -> value);
    a nested config starts from its parent's default, so what the CLI does not expose keeps that default."""

    def build(cls: type, base: Any, path: tuple[str, ...]) -> Any:
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            p = path + (f.name,)
            dotted = ".".join(p)
            if not f.init:
                continue
            if dotted in fixed:
                kwargs[f.name] = fixed[dotted]
            elif dotted in spec.dicts:
                kwargs[f.name] = {key: build(sub, sub(), p + (key,)) for key, (sub, _) in spec.dicts[dotted].items()}
            elif dataclasses.is_dataclass(hints[f.name]) and any(q[:len(p)] == p for q in [*values, *map(_split, fixed)]):
                default = _default(f, base)
                kwargs[f.name] = build(hints[f.name], None if default is REQUIRED else default, p)
            elif p in values:
                kwargs[f.name] = values[p]
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)

    return build(spec.config, None, ())


def _split(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


def _hand_flags(p: inspect.Parameter) -> list[str]:
    """The flags a hand-declared parameter takes (none for a positional argument)."""
    infos = [m for m in get_args(p.annotation)[1:] if isinstance(m, OptionInfo | ArgumentInfo)]
    if infos and isinstance(infos[0], ArgumentInfo):
        return []
    info = infos[0] if infos else None
    decls = [*([info.default] if info is not None and isinstance(info.default, str) else []),
             *((info.param_decls or ()) if info is not None else ())]
    decls = decls or ["--" + p.name.replace("_", "-")]
    return [f for d in decls for f in d.split("/")]


def command_function(body: Callable[..., Any], spec: Spec) -> Callable[..., Any]:
    """A function typer can read: ``body``'s parameters but ``config``, plus one keyword per generated option.

    Two declarations of one flag (two configs, or a config and the body) are a programming error, raised here
    with both owners named.
    """
    opts = options(spec)
    hand = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(body).parameters.values()
            if p.name != "config"]
    hints = get_type_hints(body, include_extras=True)
    hand = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in hand]
    owners: dict[str, str] = {}
    for p in hand:
        for name in [*_hand_flags(p), p.name]:
            owners[name] = f"{body.__name__}({p.name})"
    for o in opts:
        for name in [*o.flags, o.param]:
            if name in owners:
                raise ValueError(f"{name} is declared twice: by {owners[name]} and by {o.owner}")
            owners[name] = o.owner
    generated = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                   annotation=Annotated[o.annotation, typer.Option(*o.decls, help=o.help)])
                 for o in opts]
    params = ([p for p in hand if p.default is REQUIRED] + [p for p in generated if p.default is REQUIRED]
              + [p for p in generated if p.default is not REQUIRED] + [p for p in hand if p.default is not REQUIRED])

    def command(**kwargs: Any) -> Any:
        parsed = {o.path: (o, kwargs.pop(o.param)) for o in opts}

        def config(**fixed: Any) -> Any:
            return assemble(spec, {path: o.convert(v) for path, (o, v) in parsed.items()}, fixed)

        return body(**kwargs, config=config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = body.__doc__
    command.__name__ = body.__name__
    return command


class LazyCommand(TyperCommand):
    """A registered command whose real click command (and so its generated options) is built on use."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        real = self.callback.ralm_command()  # type: ignore[union-attr]  (copied onto typer's wrapper)
        return real.make_context(info_name, args, parent=parent, **extra)


def build_command(name: str, body: Callable[..., Any], spec: Spec) -> click.Command:
    """The click command typer makes of ``body`` with ``spec``'s options."""
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command(name)(command_function(body, spec))
    return typer.main.get_command(one)


def config_command(app: typer.Typer, name: str, spec: Callable[[], Spec]) -> Callable[[Callable], Callable]:
    """Register the decorated body as command ``name`` of ``app`` with the options of ``spec()`` (called on use)."""

    def register(body: Callable[..., Any]) -> Callable[..., Any]:
        def stub() -> None:
            pass

        stub.__doc__ = body.__doc__
        stub.ralm_command = lambda: build_command(name, body, spec())  # type: ignore[attr-defined]
        app.command(name, cls=LazyCommand)(stub)
        return body

    return register
