"""The README's commands exist: every `vitserve ...` line parses, `make` targets exist, and the cheap ones run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(prefix: str) -> list[str]:
    blocks = re.findall(r"^    (.+(?:\\\n.+)*)", README, flags=re.M)
    lines = [re.sub(r"\\\n\s*", " ", b).strip() for b in blocks]
    return [line.split("#")[0].strip() for line in lines if line.startswith(prefix)]


def test_vitserve_commands_in_readme_parse():
    from vitserve.cli import build_parser

    commands = _commands("vitserve ")
    assert len(commands) >= 3
    parser = build_parser()
    for cmd in commands:
        args = parser.parse_args(shlex.split(cmd)[1:])
        assert callable(args.func), cmd


def test_make_targets_in_readme_exist():
    targets = {m.split()[1] for m in _commands("make ")}
    assert {"engines", "test", "serve", "demo", "perf"} <= targets
    makefile = (ROOT / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_backbones_command_lists_the_registry():
    out = subprocess.run(
        [sys.executable, "-m", "vitserve.cli", "backbones"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for name in ("ViT-B-32", "EVA02-E-14-plus", "NV-DINOv2", "DINOv2-g"):
        assert name in out.stdout
