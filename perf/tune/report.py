"""A tune's result -> report.md, tune.json and front.png in its output folder.

The report says how each point was measured, the choice and its `tuned:` section, the Pareto front, every
configuration, what each knob did on this host, where the chosen configuration's time goes, the served vs
in-process check, and how this compares with Triton's Model Analyzer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitserve.contract import Kind, parse_backbone_model_name
from vitserve.perf.tune.measurer import MEASUREMENTS
from vitserve.perf.tune.search import Knobs, Point, knob_effects


@dataclass
class TuneResult:
    """What a tune found (filled by tune/run.py): the workload, every point, the front, the choice and its
    `tuned:` section, the in-process check, and the files written."""

    model: str
    measured_model: str
    host: str
    command: str | None
    p99_budget_ms: float | None
    max_minutes: float
    concurrencies: list[int]
    batch_sizes: list[int]
    duration_s: float
    server_mode: str
    current: Knobs
    points: list[Point]
    front: list[Point]
    chosen: Point | None
    measured_configs: int
    reused_configs: int
    truncated: bool
    note: str | None
    elapsed_s: float
    load_avg: list[float] = field(default_factory=list)  # 1-min load average at start and end (shared host?)
    tuned: dict | None = None
    written_to: str | None = None
    check: dict | None = None
    untuned: dict | None = None  # search.untuned_over_tuned: the served defaults against the choice
    engines: dict = field(default_factory=dict)  # configs.engine_candidates: flavours scored here
    files: dict[str, str] = field(default_factory=dict)


MODEL_ANALYZER = """\
Triton's own tuner, Model Analyzer (triton-inference-server/model_analyzer; docs: config_search.md,
cli.md), profiles configurations with perf_analyzer: brute search over max_batch_size, dynamic batching
and instance groups (single models), a hill-climbing quick search (the default, and the only automatic
mode, for ensemble and BLS models), optuna or manual sweeps for other config fields; in online mode with
`--latency-budget` it picks the highest throughput within the budget, and it writes the chosen configs to
an output model repository. What `vitserve tune` adds for this project's hosts: the knobs that decide a CPU
host and live inside a python-backend model (onnxruntime intra-op threads per instance, split from the
usable cores; lanes, which cut a batch into 1-thread slices run at once while a lone request keeps every
core; onnxruntime spinning), which precision the ensemble routes to and which engine (OpenVINO or
onnxruntime: the model's `flavour`, among those that pass its probe on this host) it runs on, the python
preprocess step sharing
the same cores, the p99 budget held across the whole ensemble (bytes in, embeddings out, as a client sees
it), a choice made for the whole workload (every concurrency and request size, so that a win at one does
not cost the others) rather than for one point, every served config read back and checked before it is
measured, resumable bounded runs, and a write-back that `make engines` keeps (models.yaml `tuned:`), with
served vs in-process (and vs the served model's own executor) checked after in interleaved rounds."""


def _one_line(text: str | None) -> str:
    """An error as one table cell: its first line, pipes escaped."""
    return (text or "").strip().splitlines()[0].replace("|", "/") if text else ""


def _ms(us: float | None) -> str:
    return "-" if us is None or (isinstance(us, float) and math.isnan(us)) else f"{us / 1e3:.1f}"


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _is_cpu_backbone(model: str) -> bool:
    parsed = parse_backbone_model_name(model)
    return parsed is not None and parsed[2] is Kind.CPU


def _server_cols(p: Point) -> str:
    """Queue and infer (ms) and average batch of the point's backbone: the `*_cpu` step of an ensemble, or
    the measured model itself."""
    b = next((v for k, v in p.server.items() if _is_cpu_backbone(k)), p.server.get(p.model, {}))
    return f"{_ms(b.get('queue_us'))} | {_ms(b.get('compute_infer_us'))} | {_f(b.get('avg_batch'))}"


def _points_table(points: list[Point]) -> list[str]:
    lines = [
        "| stage | configuration | concurrency | batch | img/s | p50 ms | p99 ms | backbone queue ms | backbone infer ms | avg batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if p.ok:
            lines.append(
                f"| {p.stage} | `{p.knobs.key()}` | {p.concurrency} | {p.batch_size} | {p.images_per_s:.1f} | {_ms(p.p50_us)} | "
                f"{_ms(p.p99_us)} | {_server_cols(p)} |"
            )
        else:
            lines.append(
                f"| {p.stage} | `{p.knobs.key()}` | {p.concurrency} | {p.batch_size} | failed: {_one_line(p.error)} | | | | | |"
            )
    return lines


def _breakdown(p: Point) -> list[str]:
    lines = [
        f"Configuration `{p.knobs.key()}`, concurrency {p.concurrency}, batch {p.batch_size}"
        f"{'' if p.shared_memory == 'none' else f', tensors in {p.shared_memory} shared memory'}: client p50 "
        f"{_ms(p.p50_us)} ms.",
        "",
        "| model | requests | queue ms | compute input ms | compute infer ms | compute output ms | avg batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in p.server.items():
        lines.append(
            f"| {m} | {s.get('requests')} | {_ms(s.get('queue_us'))} | {_ms(s.get('compute_input_us'))} | "
            f"{_ms(s.get('compute_infer_us'))} | {_ms(s.get('compute_output_us'))} | {_f(s.get('avg_batch'))} |"
        )
    return lines


def markdown(r: TuneResult) -> str:
    budget = f"{r.p99_budget_ms:g} ms" if r.p99_budget_ms is not None else "none"
    out = [
        f"# vitserve tune: {r.model}",
        "",
        f"Command: `{r.command}`"
        if r.command
        else "Command: (a library call, `vitserve.perf.tune.run_tune`)",
        "",
        f"- host: {r.host}; 1-min load average {' -> '.join(f'{x:.1f}' for x in r.load_avg)} at start -> end"
        + (
            " (above the core count: other jobs shared the host)"
            if max(r.load_avg or [0]) > (os.cpu_count() or 1)
            else ""
        ),
        f"- server: {r.server_mode}",
        f"- measured: `{r.measured_model}` with perf_analyzer, {', '.join(map(str, r.batch_sizes))} image(s) per "
        f"request, concurrency {', '.join(map(str, r.concurrencies))}, every configuration at each, at least {r.duration_s:g} s per point (about ten "
        "request latencies where requests are slower; each point's `duration_s` is in tune.json)",
        f"- p99 budget: {budget}; time bound {r.max_minutes:g} min, took {r.elapsed_s / 60:.1f} min; "
        f"{r.measured_configs} configurations measured now, {r.reused_configs} reused from earlier runs",
        f"- configuration before tuning: `{r.current.key()}`",
        "- weights: whatever the repository holds (random-init models time like trained ones: same graph)",
    ]
    if r.truncated:
        out.append(f"- **truncated**: {r.note}")
    out += ["", "## Chosen", ""]
    if r.chosen is None:
        out.append("No configuration met the budget; nothing was written.")
    else:
        c = r.chosen
        out += [
            f"`{c.knobs.key()}`: {c.images_per_s:.1f} img/s with p99 {_ms(c.p99_us)} ms at client concurrency "
            f"{c.concurrency}, {c.batch_size} image(s) per request; chosen for the whole workload (the geometric "
            "mean of its throughput over the best at each concurrency and batch size, p99 within the budget at "
            "each).",
            "",
            "```yaml",
            _yaml({"tuned": r.tuned}).rstrip(),
            "```",
            "",
            f"Written to: {r.written_to or 'nowhere (--no-write or no models.yaml)'}. `make engines` writes these "
            "settings into config.pbtxt (instance_group, dynamic_batching, the `onnx_cpu` parameters, the "
            "ensemble's backbone step) and marks the configs with a `vitserve_tuned` parameter.",
        ]
    if r.engines:
        out += ["", "## Engines (flavours) on this host", "", *_engines_markdown(r.engines)]
    out += ["", "## Untuned vs tuned", "", *_untuned_markdown(r)]
    out += ["", "## Pareto front (throughput vs p99)", "", *_points_table(r.front), "", "![front](front.png)"]
    out += ["", "## Every configuration", "", *_points_table(r.points)]
    effects = knob_effects(r.points)
    if effects:
        out += [
            "",
            "## What each knob did on this host",
            "",
            "Configurations that differ in one knob only, at the same concurrency and batch size: throughput and "
            "p99 of the second value over the first (geometric mean over the pairs measured).",
            "",
            "| knob | from | to | concurrency | batch | pairs | img/s x | p99 x |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {e['knob']} | {e['from']} | {e['to']} | {e['concurrency']} | {e['batch_size']} | {e['pairs']} | "
            f"{e['images_per_s_x']:.2f} | {e['p99_x']:.2f} |"
            for e in effects
        ]
    if r.chosen is not None:
        out += ["", "## Where the time goes (chosen configuration)", "", *_breakdown(r.chosen)]
    if r.check:
        out += ["", *_check_markdown(r.check)]
    out += ["", "## Model Analyzer, and what vitserve adds", "", MODEL_ANALYZER, ""]
    return "\n".join(out)


def _engines_markdown(engines: dict) -> list[str]:
    """Per variant: its flavours scored on its probe in this process before the search, what it serves
    unpinned (a configuration without `@flavour`) and which the `engine` stage pinned it to."""
    lines = [
        "Each CPU variant's flavours (engine + file) that this host's order tries, scored on the model's probe "
        "in this process as the server scores them when the model loads; the `engine` stage pinned each variant "
        "to the ones that passed (a configuration `VARIANT@FLAVOUR`; without `@`: what it serves unpinned).",
        "",
        "| variant | flavour | probe cosine | passed | serves unpinned | swept |",
        "|---|---|---:|---|---|---|",
    ]
    for variant, e in engines.items():
        if "note" in e:
            lines.append(f"| {variant} | - | - | - | - | no: {e['note']} |")
            continue
        for f, score in e["flavours"].items():
            cos = _f(score["cosine"], 6) if "cosine" in score else _one_line(score.get("error"))
            lines.append(
                f"| {variant} | {f} | {cos} | {'yes' if score['passed'] else 'no'} | "
                f"{'yes' if f == e['serves'] else ''} | {'yes' if f in e['sweep'] else ''} |"
            )
    return lines


def _untuned_markdown(r: TuneResult) -> list[str]:
    u = r.untuned
    if not u:
        return [
            "The configuration before tuning was not measured in this run (the time bound, or no choice)."
        ]
    lines = [
        f"The configuration the server had before tuning, `{u['knobs']}`, measured as it is (stage `untuned`), "
        f"against the choice, `{u['chosen']}`, at every workload point:",
        "",
        "| concurrency | images/request | untuned img/s | tuned img/s | untuned / tuned |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['concurrency']} | {row['batch_size']} | {row['untuned']:.1f} | {row['tuned']:.1f} | "
        f"{row['ratio']:.2f} |"
        for row in u["points"]
    ]
    return [*lines, "", f"Geometric mean untuned / tuned: **{u['geomean']:.2f}**."]


def _check_markdown(check: dict) -> list[str]:
    out = [
        "## Served (tuned) vs in-process",
        "",
        "In-process: the served model's own engine and file on this host ("
        + ", ".join(f"{v}: {i.get('engine', 'onnxruntime')}" for v, i in check["in_process"].items())
        + f"), {check['cores']} threads (every usable core), one call per batch, "
        "at its best batch size of those run. Served: the tensor path (`pixel_values`) of each variant with the "
        f"chosen settings. {check.get('rounds', 1)} interleaved round(s): per round and batch size, in-process "
        "then served back to back; each ratio is taken within its round, the median over the rounds is shown "
        "(with the median served point).",
        "",
    ]
    if check.get("summary"):
        out += [
            "Each variant, tensor transport and concurrency: the client batch size that served best with p99 "
            "within the budget (where none fits: the best, marked 'no') against in-process at its best batch "
            "size (the client picks its batch size as the in-process caller does). Tensors in the gRPC "
            "messages, or in system shared memory (a client on the server's host):",
            "",
            "| variant | tensors | concurrency | best client batch | served img/s | p99 ms | p99 in budget | "
            "in-process best | served / in-process |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in check["summary"]:
            best = check["in_process"][r["variant"]]["best"]
            out.append(
                f"| {r['variant']} | {_transport(r.get('shared_memory', 'none'))} | {r['concurrency']} | "
                f"{r['batch_size']} | {r['images_per_s']:.1f} | {_ms(r['p99_us'])} | "
                f"{'yes' if r.get('within_budget', True) else 'no'} | {best['images_per_s']:.1f} "
                f"(b{best['batch_size']}) | {_f(r['ratio'], 2)} |"
            )
        out += [
            "",
            "Every batch size measured (same batch: against in-process at the client's batch size):",
            "",
        ]
    out += [
        "| variant | tensors | in-process best | batch | concurrency | served img/s | p99 ms | served / in-process | "
        "same batch | same executor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in check["tensor"]:
        p, best = row["point"], check["in_process"][row["variant"]]["best"]
        served = f"{p.images_per_s:.1f}" if p.ok else f"failed: {_one_line(p.error)}"
        out.append(
            f"| {row['variant']} | {_transport(p.shared_memory)} | {best['images_per_s']:.1f} (b{best['batch_size']}) | {p.batch_size} | "
            f"{p.concurrency} | {served} | {_ms(p.p99_us)} | {_f(row['ratio'], 2)} | "
            f"{_f(row.get('same_batch_ratio'), 2)} | {_f(row.get('executor_ratio'), 2)} |"
        )
    out += [
        "",
        "Same executor: against the served model's own code (onnx_cpu.py with the chosen threads, lanes and spinning) run "
        "in this process at the client's batch size, so what is left is the cost of serving (transfer, queue, "
        "the python stub). In-process runs:",
        "",
        "| variant | batch | one session img/s | p50 ms | same executor img/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, info in check["in_process"].items():
        ex = {r["batch_size"]: r["images_per_s"] for r in info.get("executor", {}).get("runs", [])}
        for run in info["runs"]:
            out.append(
                f"| {v} | {run['batch_size']} | {run['images_per_s']:.1f} | {_ms(run['p50_us'])} | "
                f"{_f(ex.get(run['batch_size']))} |"
            )
    if check["ensemble"]:
        out += [
            "",
            "Bytes ensemble (JPEG in, preprocess + backbone on the same cores) vs the tensor path of the variant "
            "it routes to (gRPC, the median round), at the same images per request and concurrency:",
            "",
            "| batch | concurrency | ensemble img/s | p99 ms | tensor path img/s | ensemble / tensor |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in check["ensemble"]:
            p, t = row["point"], row["tensor"]
            out.append(
                f"| {p.batch_size} | {p.concurrency} | {_f(p.images_per_s)} | {_ms(p.p99_us)} | "
                f"{_f(t.images_per_s) if t else '-'} | {_f(row['ratio'], 2)} |"
            )
        out += ["", "Where the ensemble's time goes:", ""]
        for row in check["ensemble"]:
            out += [*_breakdown(row["point"]), ""]
    tensor_c1 = [row["point"] for row in check["tensor"] if row["point"].ok and row["point"].concurrency == 1]
    if tensor_c1:
        out += ["", "Where a tensor request's time goes at concurrency 1:", ""]
        for p in tensor_c1:
            out += [*_breakdown(p), ""]
    return out


def _transport(shared_memory: str) -> str:
    return "gRPC" if shared_memory == "none" else f"{shared_memory} shm"


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=10_000)


def _plot(r: TuneResult, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [p for p in r.points if p.ok]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, b in sorted({(p.concurrency, p.batch_size) for p in ok}):
        pts = [p for p in ok if (p.concurrency, p.batch_size) == (c, b)]
        ax.scatter([p.p99_us / 1e3 for p in pts], [p.images_per_s for p in pts], s=18, alpha=0.6,
                   label=f"concurrency {c}, batch {b}")  # fmt: skip
    front = sorted(r.front, key=lambda p: p.p99_us)
    ax.step([p.p99_us / 1e3 for p in front], [p.images_per_s for p in front], where="post", color="k",
            lw=1, label="Pareto front")  # fmt: skip
    if r.p99_budget_ms is not None:
        ax.axvline(r.p99_budget_ms, color="r", ls="--", lw=1, label=f"p99 budget {r.p99_budget_ms:g} ms")
    if r.chosen is not None:
        ax.scatter([r.chosen.p99_us / 1e3], [r.chosen.images_per_s], s=120, facecolors="none", edgecolors="r",
                   label="chosen")  # fmt: skip
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("images / s")
    ax.set_title(f"vitserve tune {r.model}: {r.measured_model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def _json_ready(value):
    if isinstance(value, Point):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_tune_report(r: TuneResult, out_dir: str | Path) -> dict[str, str]:
    """report.md, tune.json and front.png in `out_dir` (written to temporary names, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    plot = _plot(r, out / "front.png")
    if plot:
        files["plot"] = plot
    data = _json_ready({k: getattr(r, k) for k in r.__dataclass_fields__ if k != "files"})
    data["current"] = asdict(r.current)
    for name, text in (("tune.json", json.dumps(data, indent=1, default=str)), ("report.md", markdown(r))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)
    files["json"] = str(out / "tune.json")
    files["markdown"] = str(out / "report.md")
    files["measurements"] = str(out / MEASUREMENTS)
    return files
