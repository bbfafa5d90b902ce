"""The choice -> models.yaml: the model's `tuned:` section, which `make engines` writes into config.pbtxt.

The section is an `exporter.config.Tuned` (the owner of its field names and checks), written as plain YAML
into the model's entry with the rest of the file, comments included, kept byte for byte, and read back
through the typed config before the file is replaced.
"""

from __future__ import annotations

import datetime as _dt
import enum
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from vitserve.contract import Precision
from vitserve.errors import ConfigError
from vitserve.exporter.config import DynamicBatching, Tuned
from vitserve.perf.tune.configs import Target
from vitserve.perf.tune.search import Knobs


def tuned_section(knobs: Knobs, target: Target, *, host: str, p99_ms: float | None, report: str) -> dict:
    """The `tuned:` mapping for models.yaml (plain YAML types, Tuned's field names; unset fields left out)."""
    tuned = Tuned(
        precision=Precision(knobs.variant) if target.ensemble is not None else None,
        instances=knobs.instances,
        cpu_threads=knobs.cpu_threads,
        cpu_spinning=knobs.cpu_spinning,
        cpu_lanes=knobs.cpu_lanes,
        flavour=knobs.flavour,
        dynamic_batching=DynamicBatching(tuple(knobs.preferred), knobs.queue_delay_us),
        preprocess_instances=knobs.preprocess_instances,
        preprocess_threads=knobs.preprocess_threads,
        host=host,
        p99_budget_ms=p99_ms,
        report=report,
        tuned_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    return {
        f.name: _plain(getattr(tuned, f.name)) for f in fields(Tuned) if getattr(tuned, f.name) is not None
    }


def _plain(value: Any) -> Any:
    """A Tuned value as YAML writes it: enums by value, dataclasses as mappings, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def write_tuned(config_path: str | Path, model: str, tuned: dict) -> None:
    """Put `tuned` into `model`'s entry of models.yaml as its `tuned:` section (replacing an earlier one),
    keeping the rest of the file, comments included, byte for byte; then read the file back through the
    typed config and check it holds what was written. Written to a temporary name, renamed when whole."""
    import yaml

    from vitserve.exporter.config import load_models

    path = Path(config_path)
    text = path.read_text()
    root = yaml.compose(text)
    models = None
    if isinstance(root, yaml.MappingNode):
        models = next((v for k, v in root.value if k.value == "models"), None)
    if not isinstance(models, yaml.SequenceNode):
        raise ConfigError(f"{path}: no `models:` list to write the tuned settings into")
    entry = None
    for node in models.value:
        if isinstance(node, yaml.MappingNode) and any(
            k.value == "name" and v.value == model for k, v in node.value
        ):
            entry = node
    if entry is None:
        raise ConfigError(
            f"{path} has no model named {model!r}; tune a model of this file or pass --no-write"
        )
    if entry.flow_style:
        raise ConfigError(
            f"{path}: model {model!r} is written as a flow mapping {{...}}; write it in block style"
        )
    lines = text.splitlines(keepends=True)

    def last_line(node) -> int:
        """0-based line of the node's last character: of its last leaf for a block collection, whose own
        end mark lies past the comments that follow it."""
        while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
            last = node.value[-1]
            node = last[1] if isinstance(last, tuple) else last
        end = node.end_mark
        return end.line if end.column > 0 else end.line - 1

    indent = entry.value[0][0].start_mark.column
    existing = [(k, v) for k, v in entry.value if k.value == "tuned"]
    if existing:
        k, v = existing[0]
        start, stop = k.start_mark.line, last_line(v)
        del lines[start : stop + 1]
        insert_at = start
    else:
        insert_at = max(last_line(v) for _, v in entry.value) + 1
    block = yaml.safe_dump({"tuned": tuned}, sort_keys=False, default_flow_style=None, width=10_000)
    block = block.replace("tuned:\n", f"tuned:  # by `vitserve tune`; {tuned.get('report')}\n", 1)
    if lines and insert_at > 0 and not lines[insert_at - 1].endswith("\n"):
        lines[insert_at - 1] += "\n"
    lines[insert_at:insert_at] = [" " * indent + line for line in block.splitlines(keepends=True)]
    tmp = path.with_name(f".{path.name}.tune-tmp")
    tmp.write_text("".join(lines))
    try:
        spec = next(s for s in load_models(tmp) if s.name == model)
        expected = Tuned.parse(tuned, f"model {model} tuned")
        if spec.tuned != expected:
            raise ConfigError(
                f"writing the tuned settings into {path} did not round-trip: {spec.tuned} != {expected}"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
