"""Write a sweep's results: `points.csv`, `result.json`, two PNG plots and `report.md`.

The Markdown report puts the variants (served models, e.g. the FP32 and INT8 backbones, and the generators)
side by side per batch size and concurrency, states each model's serving efficiency against its own
in-process baseline when one was run, the precision speed-up (INT8/FP16 over FP32) as a separate table, and
starts with the exact command that produced it. Failed points and baselines are shown as failures, with
their errors. Every file is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, fields
from pathlib import Path

from vitserve.perf.sweep_result import PointResult, SweepResult, precision_speedups

CSV_NAME = "points.csv"
JSON_NAME = "result.json"
MARKDOWN_NAME = "report.md"
PLOT_THROUGHPUT = "throughput_vs_p99.png"
PLOT_LATENCY = "latency_vs_concurrency.png"


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def host_heading(section: str, isa: str) -> str:
    """The heading of a results section kept once per CPU class, e.g. "## Engines: avx2 host"."""
    return f"{section}: {isa} host"


def write_section(path: Path, heading: str, section: str, title: str) -> None:
    """Put `section` (starting with the line `heading`, e.g. "## Engines: avx2 host") into the Markdown file
    `path`: in place of the section with that heading where there is one (up to the next "## "), else at the
    end; the file starts with `title` when it is new. Other sections, other hosts' among them, are kept."""
    text = path.read_text() if path.is_file() else f"{title}\n"
    start = text.find(heading + "\n")
    if start >= 0:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    _write_atomic(path, text)


def _clean(value):
    # JSON has no NaN; null says "not measured" as it should.
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def points_csv(points: list[PointResult]) -> str:
    """The points as CSV text, one row each; error samples joined with ' | '."""
    names = [f.name for f in fields(PointResult)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for p in points:
        row = _clean(asdict(p))
        row["error_samples"] = " | ".join(row["error_samples"])
        row["server_steps"] = json.dumps(row["server_steps"]) if row["server_steps"] else ""
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _variant(p: PointResult, result: SweepResult) -> str:
    name = p.model if len(result.models) > 1 or result.generator != "both" else ""
    if result.generator == "both":
        name = f"{name} [{p.generator}]".strip()
    return name or p.model


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool) -> str:
    """Label, lay out, save (atomically) and close one plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def _plot(result: SweepResult, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    ok = [p for p in result.points if p.ok and p.p99_us is not None and not math.isnan(p.p99_us)]
    series: dict[tuple[str, int], list[PointResult]] = {}
    for p in ok:
        series.setdefault((_variant(p, result), p.batch_size), []).append(p)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (variant, b), pts in series.items():
        pts = sorted(pts, key=lambda p: p.concurrency)
        ax.plot(
            [p.p99_us / 1e3 for p in pts], [p.images_per_s for p in pts], marker="o", label=f"{variant} b{b}"
        )
        for p in pts:
            ax.annotate(f"c{p.concurrency}", (p.p99_us / 1e3, p.images_per_s), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    written.append(_finish(plt, fig, ax, out_dir / PLOT_THROUGHPUT, "p99 latency (ms)", "throughput (images/s)",
                           "Throughput vs p99 latency (labels: concurrency)", bool(series)))  # fmt: skip

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((variant, b), pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p.concurrency)
        color = f"C{i % 10}"
        xs = [p.concurrency for p in pts]
        ax.plot(xs, [p.p50_us / 1e3 for p in pts], marker="o", color=color, label=f"{variant} b{b} p50")
        ax.plot(
            xs, [p.p99_us / 1e3 for p in pts], marker="^", ls="--", color=color, label=f"{variant} b{b} p99"
        )
    written.append(_finish(plt, fig, ax, out_dir / PLOT_LATENCY, "concurrency (requests in flight)", "latency (ms)",
                           "Client latency vs concurrency", bool(series)))  # fmt: skip
    return written


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _write_atomic(path, buf.getvalue())
    return path.name


def _fmt(v, digits: int = 1, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v / scale:.{digits}f}"


def _generators(result: SweepResult) -> list[str]:
    return ["perf_analyzer", "builtin"] if result.generator == "both" else [result.generator]


def markdown(result: SweepResult) -> str:
    """The report as Markdown text."""
    lines = ["# Serving performance", ""]
    lines += ["Produced by:", "", "```", result.command or "(no command recorded)", "```", ""]
    lines += [
        f"- server (gRPC): `{result.url}`; started {result.started_at}; took {result.elapsed_s:.1f} s",
        f"- host CPU: {result.host_cpu}",
        f"- models: {', '.join(f'`{m}`' for m in result.models)}",
        f"- generator: {result.generator}; concurrency {result.concurrencies}; batch sizes {result.batch_sizes}",
        f"- per point: {result.warmup_s:g} s warm-up at the point's concurrency, then {result.duration_s:g} s "
        f"measured; time bound {result.max_total_s:g} s",
        f"- inputs: {'images from `' + result.images + '`' if result.images else 'random tensors (seed 0)'}",
        f"- points: {len(result.points)} of {result.planned_points} planned",
        "",
        "perf_analyzer (C++, unary gRPC) and the built-in generator (Python asyncio, one gRPC stream per "
        "in-flight request) both keep `concurrency` requests in flight and count the requests that start "
        "and finish inside the window. images/s = requests/s x batch size (perf_analyzer's "
        '"Inferences/Second"). Latencies are client-side; the server columns are per-request averages from '
        "Triton's statistics over the point.",
        "",
    ]
    if result.truncated:
        lines += [f"> **Incomplete:** {result.note}", ""]
    failed_baselines = [b for b in result.baselines if not b.ok]
    if result.failed_points or failed_baselines:
        lines += [
            f"> **Failures:** {len(result.failed_points)} of {len(result.points)} measured points and "
            f"{len(failed_baselines)} of {len(result.baselines)} in-process baselines failed "
            "(marked FAILED below; messages under Errors).",
            "",
        ]
    if result.baselines:
        lines += [
            "## In-process baselines",
            "",
            "Each served model against the ONNX file it runs itself (an ensemble: its backbone step's), on its"
            " engine: a vitserve CPU model's file and engine are the flavour its probe picks on this host"
            " (onnxruntime or OpenVINO, in the settings column), other models' onnxruntime's CPU provider.",
            "",
            "| ONNX | models | batch | images/s | p50 ms | p99 ms | runs | settings |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for b in result.baselines:
            users = ", ".join(f"`{m}`" for m, f in result.baseline_files.items() if f == b.onnx)
            speed = (
                f"{b.images_per_s:.1f} | {_fmt(b.p50_us, 2, 1e3)} | {_fmt(b.p99_us, 2, 1e3)} | {b.runs}"
                if b.ok
                else "**FAILED** | – | – | 0"
            )
            lines.append(
                f"| `{b.onnx}` | {users} | {b.batch_size} | {speed} | {result.baseline_settings.get(b.onnx, '')} |"
            )
        missing = [m for m in result.models if m not in result.baseline_files]
        lines += [
            "",
            "Serving efficiency = a model's served images/s / the in-process images/s of its own ONNX file at "
            "the same batch size: what Triton, gRPC, batching and (for an ensemble) image decoding cost. It "
            "is not a precision speed-up: that is the next table.",
            "",
        ]
        if missing:
            lines += [
                f"No in-process baseline (no ONNX file of their own): {', '.join(f'`{m}`' for m in missing)}.",
                "",
            ]
    speedups = precision_speedups(result)
    if speedups:
        lines += [
            "## Precision speed-up (vs the FP32 model of the same name and kind)",
            "",
            "images/s of the model / images/s of its FP32 sibling: in-process (both ONNX files, same "
            "settings) and served (same generator, batch and concurrency).",
            "",
            "| model | vs | batch | in-process | " + " | ".join(
                f"served c{c} [{g}]" for c in result.concurrencies for g in _generators(result)
            ) + " |",
            "|---|---|---:|---:|" + "---:|" * (len(result.concurrencies) * len(_generators(result))),
        ]  # fmt: skip
        by = {(r["model"], r["generator"], r["batch_size"], r["concurrency"]): r["speedup"] for r in speedups}
        for model, fp32 in dict.fromkeys((r["model"], r["fp32"]) for r in speedups):
            for b in result.batch_sizes:
                cells = [_fmt(by.get((model, "in-process", b, None)), 2)]
                cells += [
                    _fmt(by.get((model, g, b, c)), 2)
                    for c in result.concurrencies
                    for g in _generators(result)
                ]
                lines.append(f"| `{model}` | `{fp32}` | {b} | " + " | ".join(cells) + " |")
        lines.append("")

    variants = list(dict.fromkeys(_variant(p, result) for p in result.points))
    if result.points:
        lines += [
            "## Side by side",
            "",
            "Each cell: images/s · p99 ms" + (" · efficiency" if result.baselines else ""),
            "",
        ]
        lines.append("| batch | concurrency | " + " | ".join(variants) + " |")
        lines.append("|---:|---:|" + "---|" * len(variants))
        cells: dict[tuple[int, int, str], PointResult] = {
            (p.batch_size, p.concurrency, _variant(p, result)): p for p in result.points
        }
        for b in result.batch_sizes:
            for c in result.concurrencies:
                row = []
                for v in variants:
                    p = cells.get((b, c, v))
                    if p is None:
                        row.append("not run")
                    elif not p.ok:
                        row.append("**FAILED**")
                    else:
                        cell = f"{p.images_per_s:.1f} · {_fmt(p.p99_us, 2, 1e3)}"
                        if result.baselines:
                            cell += f" · {_fmt(p.efficiency, 2)}"
                        row.append(cell)
                if any(x != "not run" for x in row):
                    lines.append(f"| {b} | {c} | " + " | ".join(row) + " |")
        lines += [
            "",
            f"![throughput vs p99]({PLOT_THROUGHPUT})",
            "",
            f"![latency vs concurrency]({PLOT_LATENCY})",
            "",
        ]

        lines += [
            "## All points",
            "",
            "| model | generator | batch | conc. | req/s | images/s | p50 ms | p90 ms | p95 ms | p99 ms | failures "
            "| queue us | in us | infer us | out us | avg batch | GPU % | GPU MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in result.points:
            if not p.ok:
                first = (p.error or "no request succeeded").splitlines()[0][:80]
                lines.append(
                    f"| {p.model} | {p.generator} | {p.batch_size} | {p.concurrency} | **FAILED** | {first} "
                    f"|{' – |' * 4} {_fmt(p.failures, 0)} |{' – |' * 7}"
                )
                continue
            lines.append(
                f"| {p.model} | {p.generator} | {p.batch_size} | {p.concurrency} | {_fmt(p.requests_per_s)} "
                f"| {_fmt(p.images_per_s)} | {_fmt(p.p50_us, 2, 1e3)} | {_fmt(p.p90_us, 2, 1e3)} "
                f"| {_fmt(p.p95_us, 2, 1e3)} | {_fmt(p.p99_us, 2, 1e3)} | {_fmt(p.failures, 0)} "
                f"| {_fmt(p.server_queue_us, 0)} | {_fmt(p.server_compute_input_us, 0)} "
                f"| {_fmt(p.server_compute_infer_us, 0)} | {_fmt(p.server_compute_output_us, 0)} "
                f"| {_fmt(p.server_avg_batch, 2)} | {_fmt(p.gpu_util_pct, 0)} | {_fmt(p.gpu_mem_used_mib, 0)} |"
            )
        lines.append("")
    stepped = [p for p in result.points if p.server_steps]
    if stepped:
        lines += [
            "## Ensemble steps (server, per-request averages)",
            "",
            "| model | generator | batch | conc. | step | requests | queue us | in us | infer us | out us | avg batch |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in stepped:
            for step, st in p.server_steps.items():
                lines.append(
                    f"| {p.model} | {p.generator} | {p.batch_size} | {p.concurrency} | {step} | {st['requests']} "
                    f"| {_fmt(st['queue_us'], 0)} | {_fmt(st['compute_input_us'], 0)} "
                    f"| {_fmt(st['compute_infer_us'], 0)} | {_fmt(st['compute_output_us'], 0)} "
                    f"| {_fmt(st['avg_batch'], 2)} |"
                )
        lines.append("")
    errors = [p for p in result.points if p.error or p.error_samples]
    if errors or failed_baselines:
        lines += ["## Errors", ""]
        for b in failed_baselines:
            lines += [f"- in-process baseline `{b.onnx}` batch {b.batch_size}:", "", "  ```",
                      *("  " + x for x in (b.error or "").splitlines()), "  ```"]  # fmt: skip
        for p in errors:
            msg = p.error or "; ".join(p.error_samples)
            lines += [f"- `{p.model}` {p.generator} batch {p.batch_size} concurrency {p.concurrency} "
                      f"({p.failures or 0} failed requests):", "", "  ```", *("  " + x for x in msg.splitlines()), "  ```"]  # fmt: skip
        lines.append("")
    lines += [
        "Files: " + ", ".join(f"`{name}`" for name in (CSV_NAME, JSON_NAME, PLOT_THROUGHPUT, PLOT_LATENCY)),
        "",
    ]
    return "\n".join(lines)


def write_report(result: SweepResult, out_dir: str | Path) -> dict[str, str]:
    """Write CSV, JSON, plots and Markdown for `result` into `out_dir`; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": str(out_dir / CSV_NAME),
        "json": str(out_dir / JSON_NAME),
        "markdown": str(out_dir / MARKDOWN_NAME),
        "plot_throughput": str(out_dir / PLOT_THROUGHPUT),
        "plot_latency": str(out_dir / PLOT_LATENCY),
    }
    result.files = files
    _write_atomic(out_dir / CSV_NAME, points_csv(result.points))
    _plot(result, out_dir)
    _write_atomic(out_dir / MARKDOWN_NAME, markdown(result))
    _write_atomic(out_dir / JSON_NAME, json.dumps(_clean(result.to_dict()), indent=2) + "\n")
    return files
