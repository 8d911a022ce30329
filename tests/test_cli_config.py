"""Options declared once (issue 12): each command's flags and their help come from its config dataclass.

A toy config gets the flags, defaults and help it declares (int, float, bool, Optional, list, tuple of floats,
nested); a bad value is one line naming the flag, exit 2; every field any command exposes has help; a flag
declared twice is refused naming both owners; a method registered after import gets its flags in eval-lm;
another method's option is refused. At b0e1c0f (before cli_config) the CLI re-declared every option by hand.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from badinput import fails, runner
from ralm.cli import app
from ralm.cli_config import Spec, build_command, config_command, options
from ralm.core.registry import Method, Session, check_options, register_method, unregister_method
from ralm.errors import RalmError
from ralm.methods.knnlm import KNNLMConfig


@dataclass
class Inner:
    width: int = field(default=8, metadata={"help": "inner width"})
    ratio: float | None = field(default=None, metadata={"help": "an optional ratio"})


@dataclass
class Toy:
    name: str = field(metadata={"help": "a required name", "short": "-n"})
    count: int = field(default=3, metadata={"help": "how many"})
    scale: float = field(default=0.5, metadata={"help": "a scale"})
    loud: bool = field(default=True, metadata={"help": "shout"})
    force: bool = field(default=False, metadata={"help": "overwrite"})
    limit: int | None = field(default=None, metadata={"help": "at most this many"})
    files: list[str] | None = field(default=None, metadata={"help": "input files"})
    grid: tuple[float, ...] = field(default=(0.1, 1.0), metadata={"help": "grid values", "flag": "--the-grid"})
    layers: list[int] | None = field(default=None, metadata={"help": "layer indices"})
    inner: Inner = field(default_factory=lambda: Inner(width=16))
    hidden: int = field(default=7, metadata={"help": "not on the CLI", "cli": False})

    def __post_init__(self) -> None:
        if self.count < 1:
            raise RalmError(f"--count {self.count}: must be >= 1")


def toy_app(spec: Spec) -> tuple[typer.Typer, list]:
    got: list = []
    toy = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @config_command(toy, "run", lambda: spec)
    def run(config, json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
        """Run the toy."""
        from ralm.cli_options import fail

        try:
            got.append(config())
        except RalmError as e:
            fail(e)

    @toy.command()
    def other() -> None:
        """A second command (so the app is a group, as ralm's)."""

    return toy, got


def test_toy_flags_defaults_and_help():
    toy, got = toy_app(Spec(Toy))
    res = CliRunner().invoke(toy, ["run", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    for text in ("--name", "-n", "a required name", "--count", "how many", "--loud", "--no-loud", "--force",
                 "--limit", "--files", "--the-grid", "0.1,1", "--layers", "--width", "inner width", "--ratio", "--json"):
        assert text in res.output, text
    assert "--no-force" not in res.output and "--hidden" not in res.output and "--grid " not in res.output
    assert "[default: 16]" in res.output  # a nested config's default comes from its parent's default

    res = CliRunner().invoke(toy, ["run", "-n", "x"])
    assert res.exit_code == 0, res.output
    assert got[-1] == Toy(name="x")

    res = CliRunner().invoke(toy, ["run", "--name", "y", "--count", "5", "--scale", "2", "--no-loud", "--force",
                                   "--limit", "4", "--files", "a", "--files", "b", "--the-grid", "0.2, 3",
                                   "--layers", "1,2", "--width", "4", "--ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert got[-1] == Toy(name="y", count=5, scale=2.0, loud=False, force=True, limit=4, files=["a", "b"],
                          grid=(0.2, 3.0), layers=[1, 2], inner=Inner(width=4, ratio=0.5))
    assert isinstance(got[-1].grid, tuple) and isinstance(got[-1].layers, list)


@pytest.mark.parametrize("args, needles", [
    (["--the-grid", "0.1,x"], ("--the-grid", "'0.1,x'", "numbers")),
    (["--layers", "1,two"], ("--layers", "integers")),
    (["--count", "0"], ("--count", ">= 1")),  # the config's own validation, one line as well
])
def test_bad_value_is_one_line_naming_the_flag(args, needles):
    toy, got = toy_app(Spec(Toy))
    res = CliRunner().invoke(toy, ["run", "-n", "x", *args])
    assert res.exit_code == 2
    fails(res, *needles)
    assert not got


def test_field_without_help_is_refused():
    @dataclass
    class NoHelp:
        size: int = 3

    with pytest.raises(TypeError, match="NoHelp.size: no help"):
        options(Spec(NoHelp))


@dataclass
class Twice:
    count: int = field(default=1, metadata={"help": "a second --count"})


@dataclass
class Both:  # nested configs are defined at module level: their annotations resolve there
    toy: Toy = field(default_factory=lambda: Toy(name="a"))
    twice: Twice = field(default_factory=Twice)


def test_flag_declared_twice_names_both_owners():
    with pytest.raises(ValueError, match="--count is declared twice: by Toy.count and by Twice.count"):
        build_command("run", lambda config: None, Spec(Both))

    def body(config, count: int = 1) -> None:
        pass

    with pytest.raises(ValueError, match=r"by body\(count\) and by Toy.count"):
        build_command("run", body, Spec(Toy))


def _all_commands(group, prefix=()):
    for name in group.list_commands(None):
        cmd = group.get_command(None, name)
        if hasattr(cmd, "list_commands"):
            yield from _all_commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_exposed_config_field_has_help_and_the_lazy_commands_build():
    """Builds each config-driven command (as its run or --help does): a field without help, a type with no
    command-line form or a flag declared twice would raise here."""
    built = 0
    for path, cmd in _all_commands(typer.main.get_command(app)):
        if not hasattr(cmd.callback, "ralm_command"):
            continue
        real = cmd.callback.ralm_command()
        built += 1
        for p in real.params:
            assert p.help, (path, p.name)
    assert built == 13  # build, eval-lm, eval-qa, scale, retrofit, generate, tune, eval-task, knnlm build,
    # retroprompt train, retroprompt memo, serve, diagnose


def test_flags_come_from_the_configs():
    """The flags README and the tests use, generated from the configs (names and defaults as before)."""
    def flags(*cmd):
        group = typer.main.get_command(app)
        for name in cmd:
            group = group.get_command(None, name)
        real = group.callback.ralm_command()
        return {o: p.default for p in real.params for o in (*p.opts, *p.secondary_opts)}

    ev = flags("eval-lm")
    assert ev["--stride"] == 16 and ev["--query-len"] == 32 and ev["--k"] == 1024 and ev["--lmbda"] == 0.25
    assert ev["--checkpoint"] is None and ev["--retrieval"] == "on" and ev["--lmbda-grid"].startswith("0,0.05")
    assert {"--window-stride", "--max-docs", "--no-exclude-same-doc", "--leakage-report"} <= set(ev)
    sc = flags("scale")
    assert sc["--fractions"] == "0.01,0.1,0.3,1" and sc["--query-len"] == 32 and "--checkpoint" in sc
    assert "--method" not in sc and "--subset" not in sc and "-o" in sc
    b = flags("build")
    assert b["--encoder"] == "minilm" and b["--encoder-dtype"] == "auto" and b["--index"] == "auto"
    assert "--metric" not in b and "--no-dedup" not in b and "-o" in b
    assert flags("knnlm", "build")["--target-recall"] == 0.9
    r = flags("retrofit")
    assert "--neighbours-cache" in r and r["--neighbours"] == 2 and "--no-match-gate" in r and "--no-bf16" in r


def test_a_method_registered_later_gets_its_flags_in_eval_lm(tiny_lm, tmp_path):
    @dataclass
    class ToyOptions:
        spread: float = field(default=1.0, metadata={"help": "toy: added to every NLL"})

        def __post_init__(self) -> None:
            if self.spread < 0:
                raise RalmError(f"--spread {self.spread}: must be >= 0")

    register_method(Method(name="toy-spread", help="toy", store="none", config=ToyOptions, options="toy_spread",
                           open=lambda ctx: Session()))
    try:
        res = runner.invoke(app, ["eval-lm", "--help"], env={"COLUMNS": "250"})
        assert "--spread" in res.output and "toy-spread: toy: added to every NLL" in res.output
        fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(tmp_path), "--method", "toy-spread",
                                  "--spread", "-1"]), "--spread", ">= 0")
        fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(tmp_path), "--spread", "2"]),
              "--spread is for --method toy-spread, not none")
    finally:
        unregister_method("toy-spread")
    assert "--spread" not in runner.invoke(app, ["eval-lm", "--help"]).output


def test_another_methods_option_is_refused(tiny_lm, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some held-out words\n")
    fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(data), "--checkpoint", "x"]),
          "--checkpoint is for --method retro, not none")
    fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(data), "--k", "8"]),
          "--k is for --method knn-lm, not none")
    fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(data), "--method", "knn-lm",
                              "--datastore", str(tmp_path), "--stride", "8"]),
          "--stride is for --method in-context or replug, not knn-lm")
    # scale runs several methods: the options of any of them are allowed, the others' refused
    fails(runner.invoke(app, ["scale", "--model", tiny_lm, "--data", str(data), "--out", str(tmp_path / "o"),
                              "--datastore", str(tmp_path), "--methods", "in-context,replug", "--k", "8"]),
          "--k is for --method knn-lm, not in-context, replug")
    options = check_options({"knn": KNNLMConfig(k=8)}, ["in-context", "knn-lm"])
    assert options["knn"].k == 8 and set(options) >= {"in_context", "knn", "retro"}
    with pytest.raises(ValueError, match="no registered method reads them"):
        check_options({"magic": KNNLMConfig()}, ["none"])


def test_ralm_help_and_info_do_not_load_torch():
    """The configs live in modules that load torch: a command's options are generated only when it is used."""
    code = ("import sys; from typer.testing import CliRunner; from ralm.cli import app; "
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
            "assert CliRunner().invoke(app, ['info', '--help']).exit_code == 0; "
            "assert 'torch' not in sys.modules, 'torch loaded'; "
            "assert CliRunner().invoke(app, ['eval-lm', '--help']).exit_code == 0; print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr
