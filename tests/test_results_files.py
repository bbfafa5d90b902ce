"""Every measured-numbers file (`perf/results/**/*.md`) names a command that could have produced it.

The command is read from the file ("Command: `...`", or a code block after "Produced by:"), split as a
shell would, and checked against the code as it is now: the module, script, `vitserve` entry point or
make target exists, and its own argparse parser accepts the command line (flags, values, subcommand).
The parser is stopped right after parsing, so nothing is measured. Where the file's JSON twin says what
was run (the precisions of a `bench_pipeline precision` run, the models of a `vitserve perf` sweep), the
command's arguments must say the same.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "perf" / "results"
FILES = sorted(RESULTS.rglob("*.md"))


def named_command(text: str) -> str | None:
    """The command a results file names, or None."""
    head = "\n".join(text.splitlines()[:40])
    m = re.search(r"^Command:\s*`([^`]+)`", head, re.M)
    if m:
        return m.group(1).strip()
    m = re.search(r"^(?:Produced by|Command):?\s*\n+```[a-z]*\n(.+?)\n```", head, re.M | re.S)
    return m.group(1).replace("\\\n", " ").strip() if m else None


def _package_dirs() -> dict[str, str]:
    """Folder -> package, from pyproject's package-dir (perf -> vitserve.perf, ...)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = project["tool"]["setuptools"]["package-dir"]
    return {folder: package for package, folder in mapping.items()}


def _entry_point(name: str) -> str | None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project["project"].get("scripts", {}).get(name)


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _parse(main, argv: list[str], prog: str, monkeypatch, capsys) -> argparse.Namespace:
    """The namespace `main(argv)` parses its command line into; fails with argparse's own message."""
    real = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
        m.setattr(sys, "argv", [prog, *argv])
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            pytest.fail(
                f"`{prog} {shlex.join(argv)}` is refused by its parser (exit {e.code}): {capsys.readouterr().err}"
            )
    pytest.fail(f"{prog}: main() returned without parsing a command line")


def resolve(command: str) -> tuple[object, list[str], str]:
    """(main function, argv, program) of a command line; AssertionError saying what does not exist."""
    tokens = shlex.split(command)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # leading VAR=value
        tokens.pop(0)
    assert tokens, "empty command"
    if Path(tokens[0]).name.startswith("python") and tokens[1:2] == ["-m"]:
        module = tokens[2]
        assert importlib.util.find_spec(module) is not None, f"module {module} does not exist"
        mod = importlib.import_module(module)
        assert hasattr(mod, "main"), f"module {module} has no main()"
        return mod.main, tokens[3:], f"python -m {module}"
    if Path(tokens[0]).name.startswith("python") and tokens[1].endswith(".py"):
        script = ROOT / tokens[1]
        assert script.is_file(), f"script {tokens[1]} does not exist"
        assert 'if __name__ == "__main__":' in script.read_text(), f"{tokens[1]} does not run as a script"
        folder = script.parent.relative_to(ROOT).as_posix()
        package = _package_dirs().get(folder)
        assert package, f"{tokens[1]} is not in a vitserve package folder"
        mod = importlib.import_module(f"{package}.{script.stem}")
        return mod.main, tokens[2:], tokens[1]
    if tokens[0] == "vitserve":
        target = _entry_point("vitserve")
        assert target, "pyproject.toml has no `vitserve` entry point"
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func), tokens[1:], "vitserve"
    if tokens[0] == "make":
        targets = [t for t in tokens[1:] if "=" not in t and not t.startswith("-")]
        makefile = (ROOT / "Makefile").read_text()
        for t in targets:
            assert re.search(rf"^{re.escape(t)}\s*:", makefile, re.M), f"Makefile has no target {t}"
        return None, targets, "make"
    raise AssertionError(
        f"unknown kind of command {tokens[0]!r} (python -m, python SCRIPT, vitserve or make)"
    )


def _json_twin(md: Path) -> dict | None:
    twin = md.with_name("result.json") if md.name == "report.md" else md.with_suffix(".json")
    return json.loads(twin.read_text()) if twin.is_file() else None


@pytest.mark.parametrize("md", FILES, ids=[f.relative_to(RESULTS).as_posix() for f in FILES])
def test_results_file_names_a_command_that_exists(md, monkeypatch, capsys):
    command = named_command(md.read_text())
    assert command, (
        f"{md.relative_to(ROOT)} names no command (`Command: ...` or a block after `Produced by:`)"
    )
    try:
        main, argv, prog = resolve(command)
    except AssertionError as e:
        pytest.fail(f"{md.relative_to(ROOT)} names `{command}`: {e}")
    if main is None:  # a make target: it exists
        return
    args = _parse(main, argv, prog, monkeypatch, capsys)
    data = _json_twin(md)
    if data is None:
        return
    if prog == "python -m vitserve.perf.bench_pipeline" and argv[:1] == ["precision"]:
        # a backbone whose FP32 export failed has one fp32 row with the error and no variants
        failed = {r["backbone"] for r in data["rows"] if r["variant"] == "fp32"}
        built = {(r["backbone"], r["variant"]) for r in data["rows"] if r["variant"] != "fp32"}
        wanted = {(b, p) for b in args.backbones if b not in failed for p in args.precisions}
        assert built == wanted, (
            f"{md.relative_to(ROOT)}: `{command}` builds {sorted(wanted)}, the file has {sorted(built)}"
        )
    if prog == "vitserve" and argv[:1] == ["perf"]:
        assert data["command"] == command
        assert (data["models"], data["batch_sizes"], data["concurrencies"]) == (
            args.model,
            args.batch,
            args.concurrency,
        ), f"{md.relative_to(ROOT)}: its result.json is not what `{command}` sweeps"


def test_a_wrong_command_is_caught(monkeypatch, capsys):
    """The check itself: an unknown flag, subcommand or module fails it."""
    main, argv, prog = resolve("python -m vitserve.perf.bench_pipeline precision --backbones ViT-B-16")
    assert _parse(main, argv, prog, monkeypatch, capsys).precisions == ["fp16", "int8", "cpu-int8"]
    for bad in ("precision --no-such-flag 1", "no-such-subcommand"):
        with pytest.raises(pytest.fail.Exception, match="refused by its parser"):
            _parse(main, shlex.split(bad), prog, monkeypatch, capsys)
    with pytest.raises(AssertionError, match="does not exist"):
        resolve("python -m vitserve.perf.no_such_bench --x 1")
    assert (
        named_command("# t\n\nProduced by:\n\n```\nvitserve perf --model m\n```\n")
        == "vitserve perf --model m"
    )
