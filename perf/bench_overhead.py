"""Per-request overhead: the served CPU backbone over the same engine in this process, and where the time goes.

    python -m vitserve.perf.bench_overhead --repository model_repository \
        --models vitb32_fp32_cpu vitb32_cpu-int8_cpu --rounds 5 --seconds 3

Three points per CPU backbone model (tensor inputs over gRPC, the real perf_analyzer, as `vitserve perf` and
`vitserve tune` measure): one client sending single images (c=1, b=1) against in-process batch 1; four
clients sending single images (c=4, b=1) against in-process batch 4 (the batch the server could make of
them); one client sending 8-image requests (c=1, b=8) against in-process batch 8.

In-process is the served model's own code (onnx_cpu.py) initialised here with the repository's parameters,
so it picks the engine and file (flavour) the server picks on this host, timed on its wide session alone:
one call per batch, every usable core as intra-op threads, lanes off, the engine's default spinning (what
in-process onnxruntime on the same file and threads runs). A shared host's speed drifts by more than the
effect measured, so each point is a pair run back to back (in-process, then served), repeated in `--rounds`
rounds, and each ratio is taken within its pair: the median over the rounds is reported with the lowest and
highest. Around every served window Triton's statistics give the server's side per request (queue, compute
input / infer / output, average batch executed): served latency minus those is the client and the transfer.

Results: perf/results/overhead-ISA.json and the section "## Per-request overhead: ISA host" of
perf/results/cpu_engines.md, one per CPU class (replaced when it is there; the file's other sections, other
hosts' among them, are left as they are). `--tune-report` adds the
untuned/tuned summary of a `vitserve tune` run (its tune.json). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SECTION = "## Per-request overhead"
# (concurrency, images per request) -> the in-process batch it is compared with
POINTS = {(1, 1): 1, (4, 1): 4, (1, 8): 8}


def in_process(model_dir: Path, cores: int, flavour: str | None = None):
    """The served model initialised here as the server initialises it (same flavour, file and threads;
    `flavour`: pinned, as `vitserve tune` serves it), with lanes off and the engine's default spinning: its
    `session` is the in-process reference."""
    from vitserve.contract import CpuBackboneParams
    from vitserve.exporter.repository import read_config, read_params
    from vitserve.perf.bench_lanes import load

    params = read_params(read_config(model_dir / "config.pbtxt"), CpuBackboneParams)
    flavour = flavour or params.flavour
    return load(
        model_dir,
        replace(params, cpu_threads=cores, cpu_lanes=1, cpu_spinning=None, share=1, flavour=flavour),
    )


def timed_runs(model, x: np.ndarray, seconds: float) -> tuple[float, list[float]]:
    """Images/s and each call's seconds of the model's wide session on `x`, one call per batch, for
    `seconds` (after one untimed call)."""
    feed = {model.input_name: x}
    model.session.run(model.outputs, feed)
    lat, t0 = [], time.perf_counter()
    while not lat or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        model.session.run(model.outputs, feed)
        lat.append(time.perf_counter() - t)
    return len(lat) * len(x) / (time.perf_counter() - t0), lat


def images_per_s(model, x: np.ndarray, seconds: float) -> tuple[float, float]:
    """Images/s and median latency (ms) of the model's wide session on `x`, one call per batch."""
    ips, lat = timed_runs(model, x, seconds)
    return ips, statistics.median(lat) * 1e3


def served_file(model_dir: Path, model) -> tuple[str, Path]:
    """The engine (flavour) and file an in-process model (`in_process`) picked on this host."""
    from vitserve.contract import ONNX_FILE, CpuBackboneParams
    from vitserve.exporter.repository import read_config, read_params

    params = read_params(read_config(model_dir / "config.pbtxt"), CpuBackboneParams)
    flavour = getattr(model, "flavour", None)
    return flavour or "onnxruntime", model_dir / "1" / params.flavours.get(flavour, ONNX_FILE)


def copy_us_per_image(shape: list[int]) -> float:
    """What one more copy of an image costs here (us): the python backend copies each input twice (into
    its shared memory, then into the stub's numpy array) and the model once more to join the requests of
    a batch."""
    x = np.random.default_rng(0).standard_normal([4, *shape]).astype(np.float32)
    parts = [x[i : i + 1] for i in range(4)]
    runs = []
    for _ in range(50):
        t = time.perf_counter()
        np.concatenate(parts)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) / 4 * 1e6


def run(url: str, repository: Path, models: list[str], rounds: int, seconds: float, work: Path) -> dict:
    from vitserve.contract import CpuBackboneParams
    from vitserve.exporter.hostinfo import cpu_summary
    from vitserve.exporter.triton_models.onnx_cpu import cpu_flags, host_isa, served_threads, usable_cores
    from vitserve.perf.bench_lanes import read_dims
    from vitserve.perf.inputs import connect, describe_model, make_payloads
    from vitserve.perf.measure import Generator, measure_point

    cores = usable_cores()
    out = {
        "host": cpu_summary(),
        "isa": host_isa(cpu_flags()),
        "cores": cores,
        "rounds": rounds,
        "seconds": seconds,
        "models": {},
    }
    client = connect(url)
    rng = np.random.default_rng(0)
    try:
        for name in models:
            model_dir = repository / name
            if not (model_dir / "config.pbtxt").is_file():
                raise SystemExit(
                    f"{model_dir}: no such model in the repository (build it with `make engines`)"
                )
            shape = read_dims(model_dir)
            spec = describe_model(url, name)
            served_config = client.get_model_config(name, as_json=True)["config"]
            ref = in_process(model_dir, cores)
            threads = served_threads(served_config, CpuBackboneParams.from_model_config(served_config))[2]
            if threads != cores:  # e.g. `share` > 1: several models of the repository split the cores
                print(f"WARNING: {name} serves with {threads} thread(s), the in-process reference with {cores}: "
                      "the ratio compares different thread counts (`share` or instances in its config)", flush=True)  # fmt: skip
            pairs: dict[str, list[dict]] = {f"c{c}_b{b}": [] for c, b in POINTS}
            try:
                for r in range(rounds):
                    for (c, b), ref_batch in POINTS.items():
                        x = rng.standard_normal([ref_batch, *shape]).astype(np.float32)
                        ips, p50 = images_per_s(ref, x, seconds)
                        m = measure_point(
                            url, spec, generator=Generator.PERF_ANALYZER, concurrency=c, batch_size=b,
                            duration_s=seconds, warmup_s=1.0, payloads=make_payloads(spec, b, count=2),
                            csv_path=work / f"pa_{name}_c{c}_b{b}.csv", stretch=True, client=client,
                        )  # fmt: skip
                        d = m.server[name]
                        row = {
                            "round": r, "in_process_images_per_s": ips, "in_process_p50_ms": p50,
                            "served_images_per_s": m.images_per_s, "ratio": m.images_per_s / ips,
                            "served_p50_ms": m.percentiles_us[50] / 1e3, "load_avg": os.getloadavg()[0],
                            "server": {**m.server_row(name), "executions": d.executions},
                        }  # fmt: skip
                        pairs[f"c{c}_b{b}"].append(row)
                        print(f"{name} c{c} b{b} round {r}: {ips:.2f} in-process, {m.images_per_s:.2f} served "
                              f"({row['ratio']:.2f}), avg batch {d.avg_batch}", flush=True)  # fmt: skip
            finally:
                ref.finalize()
            out["models"][name] = {
                "engine": getattr(ref, "flavour", None) or "onnxruntime",
                "threads": cores,
                "served_threads": threads,
                "served": _served_settings(served_config),
                "points": {k: _summary(v) for k, v in pairs.items()},
                "pairs": pairs,
            }
        out["copy_us_per_image"] = copy_us_per_image(read_dims(repository / models[0]))
    finally:
        client.close()
    return out


def untuned_vs_tuned(url: str, tune: dict, rounds: int, seconds: float, work: Path) -> dict:
    """The configuration the server had before `vitserve tune` against its choice (tune.json), on the tensor
    path of the backbone each routes to, at the tune's workload points, in back-to-back pairs per round
    (each reloaded through Triton's load API with a config override, as the tuner serves it): a tune
    measures each configuration once, and a shared host drifts by more than the difference."""
    from vitserve.contract import Kind, backbone_model_name
    from vitserve.perf.inputs import connect, describe_model, make_payloads
    from vitserve.perf.measure import Generator, measure_point
    from vitserve.perf.tune.configs import backbone_override
    from vitserve.perf.tune.search import Knobs

    knobs = {"untuned": Knobs.from_dict(tune["current"]), "tuned": Knobs.from_dict(tune["chosen"]["knobs"])}
    names = {k: backbone_model_name(tune["model"], v.variant, Kind.CPU) for k, v in knobs.items()}
    workload = [(c, b) for b in tune["batch_sizes"] for c in tune["concurrencies"]]
    client = connect(url)
    rows: dict[tuple[int, int], list[dict]] = {w: [] for w in workload}
    try:
        base = {n: client.get_model_config(n, as_json=True)["config"] for n in set(names.values())}
        for r in range(rounds):
            got: dict[tuple[int, int], dict[str, float]] = {w: {} for w in workload}
            # one reload per configuration and round, which goes first alternating
            for label in ("untuned", "tuned") if r % 2 == 0 else ("tuned", "untuned"):
                name = names[label]
                client.load_model(name, config=json.dumps(backbone_override(base[name], knobs[label], True)))
                spec = describe_model(url, name)
                for c, b in workload:
                    m = measure_point(
                        url, spec, generator=Generator.PERF_ANALYZER, concurrency=c, batch_size=b,
                        duration_s=seconds, warmup_s=1.0, payloads=make_payloads(spec, b, count=2),
                        csv_path=work / f"pa_{label}_c{c}_b{b}.csv", stretch=True, client=client,
                    )  # fmt: skip
                    got[(c, b)][label] = m.images_per_s
            for (c, b), g in got.items():
                rows[(c, b)].append({"round": r, **g, "ratio": g["untuned"] / g["tuned"]})
                print(f"untuned/tuned c{c} b{b} round {r}: {g}", flush=True)
    finally:
        client.close()
    points = []
    for (c, b), rs in rows.items():
        ratios = [x["ratio"] for x in rs]
        points.append({"concurrency": c, "batch_size": b, "ratio": statistics.median(ratios),
                       "ratio_min": min(ratios), "ratio_max": max(ratios),
                       "untuned": statistics.median(x["untuned"] for x in rs),
                       "tuned": statistics.median(x["tuned"] for x in rs)})  # fmt: skip
    geomean = statistics.geometric_mean(p["ratio"] for p in points)
    return {"tune_command": tune.get("command"), "knobs": knobs["untuned"].key(), "chosen": knobs["tuned"].key(),
            "rounds": rounds, "seconds": seconds, "points": points, "geomean": geomean,
            "pairs": {f"c{c}_b{b}": rs for (c, b), rs in rows.items()}}  # fmt: skip


def _served_settings(config: dict) -> str:
    """The served settings that decide overhead, as one line."""
    from vitserve.contract import CpuBackboneParams
    from vitserve.exporter.triton_models.onnx_cpu import served_threads

    p = CpuBackboneParams.from_model_config(config)
    db = config.get("dynamic_batching") or {}
    instances, _, threads = served_threads(config, p)
    spin = {None: "default", True: "on", False: "off"}[p.cpu_spinning]
    return (
        f"{instances} instance(s), cpu_threads {p.cpu_threads} = {threads}, cpu_lanes {p.cpu_lanes}, spinning {spin}, "
        f"max_queue_delay {int(db.get('max_queue_delay_microseconds', 0) or 0)} us, "
        f"preferred {[int(b) for b in db.get('preferred_batch_size', [])]}"
    )


def _summary(rows: list[dict]) -> dict:
    def med(key: str, server: bool = False) -> float | None:
        vals = [(r["server"] if server else r)[key] for r in rows]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    ratios = [r["ratio"] for r in rows]
    return {
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "in_process_images_per_s": med("in_process_images_per_s"), "in_process_p50_ms": med("in_process_p50_ms"),
        "served_images_per_s": med("served_images_per_s"), "served_p50_ms": med("served_p50_ms"),
        "load_avg": med("load_avg"),
        **{k: med(k, server=True) for k in ("queue_us", "compute_input_us", "compute_infer_us",
                                            "compute_output_us", "avg_batch")},
    }  # fmt: skip


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def section(
    result: dict,
    command: str,
    tune: dict | None = None,
    before: dict | None = None,
    notes: str | None = None,
    interleaved: dict | None = None,
) -> str:
    """The Markdown section for cpu_engines.md; `before`: an earlier run's overhead-ISA.json (the served
    settings before a change), shown beside this run's ratios."""
    lines = [
        heading(result["isa"]),
        "",
        f"Command: `{command}`",
        "",
        f"- host: {result['host']}; 1-min load average during the run "
        f"{_f(min(p['load_avg'] for m in result['models'].values() for p in m['points'].values()))}-"
        f"{_f(max(p['load_avg'] for m in result['models'].values() for p in m['points'].values()))} "
        f"on {result['cores']} core(s) (a shared host: ratios are taken within back-to-back pairs)",
        f"- served: the real tritonserver, tensor inputs over gRPC, the real perf_analyzer; in-process: the "
        f"served model's engine and file on this host, {result['cores']} threads, one call per batch; "
        f"{result['rounds']} rounds of {result['seconds']:g} s pairs, medians (lowest-highest)",
        "- RANDOM-INIT weights (same graph, same speed)",
        "",
        "| model (engine) | served settings | point | in-process | in-process img/s | served img/s | "
        "served / in-process | queue ms | compute input ms | compute infer ms | compute output ms | avg batch |"
        + (" before: served / in-process | before: queue ms | before: avg batch |" if before else ""),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if before else ""),
    ]
    for name, m in result["models"].items():
        for (c, b), ref_batch in POINTS.items():
            p = m["points"][f"c{c}_b{b}"]
            lines.append(
                f"| {name} ({m['engine']}) | {m['served']} | c={c}, {b} image(s)/request | batch {ref_batch} | "
                f"{_f(p['in_process_images_per_s'])} | {_f(p['served_images_per_s'])} | "
                f"**{p['ratio']:.2f}** ({p['ratio_min']:.2f}-{p['ratio_max']:.2f}) | "
                f"{_f(_ms(p['queue_us']), '.2f')} | {_f(_ms(p['compute_input_us']), '.2f')} | "
                f"{_f(_ms(p['compute_infer_us']))} | {_f(_ms(p['compute_output_us']), '.2f')} | "
                f"{_f(p['avg_batch'], '.2f')} |" + _before_cells(before, name, f"c{c}_b{b}")
            )
    lines += ["", "Where a lone request's time goes (c=1, 1 image; medians, ms):", ""]
    lines += ["| model | served p50 | in-process p50 | queue | compute input | compute infer - in-process | "
              "compute output | client + transfer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in result["models"].items():
        p = m["points"]["c1_b1"]
        server = [
            _ms(p[k]) or 0.0
            for k in ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")
        ]
        rest = p["served_p50_ms"] - sum(server)
        lines.append(
            f"| {name} | {p['served_p50_ms']:.1f} | {p['in_process_p50_ms']:.1f} | {server[0]:.2f} | "
            f"{server[1]:.2f} | {server[2] - p['in_process_p50_ms']:.2f} | {server[3]:.2f} | {rest:.2f} |"
        )
    lines += [
        "",
        f"One more copy of an image costs {result['copy_us_per_image']:.0f} us here: the python backend copies "
        "each input into its shared memory and again into the stub's numpy array, and the model joins the "
        "requests of a batch (np.concatenate): a few hundredths of a millisecond per image.",
    ]
    if before:
        served = "; ".join(f"{n}: {m['served']}" for n, m in before["models"].items())
        lines += ["", f"Before: `{before['command']}` ({before['host']}); served: {served}."]
    if tune:
        lines += ["", *untuned_lines(tune, interleaved)]
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def _before_cells(before: dict | None, model: str, point: str) -> str:
    if not before:
        return ""
    p = before["models"].get(model, {}).get("points", {}).get(point)
    if p is None:
        return " - | - | - |"
    return (
        f" {p['ratio']:.2f} ({p['ratio_min']:.2f}-{p['ratio_max']:.2f}) | {_f(_ms(p['queue_us']), '.2f')} | "
        f"{_f(p['avg_batch'], '.2f')} |"
    )


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def untuned_lines(tune: dict, interleaved: dict | None = None) -> list[str]:
    """The untuned/tuned summary of a `vitserve tune` run (its tune.json: one measurement per configuration)
    and, where given, of `untuned_vs_tuned` (the two in back-to-back pairs, medians over rounds)."""
    u = tune.get("untuned") or {}
    lines = [
        f"Untuned / tuned (`{tune.get('command')}`, {tune.get('measured_model')}): the configuration the server "
        f"had before tuning, `{u.get('knobs', '-')}`, against the choice, `{u.get('chosen', '-')}`, at every "
        "workload point (images/s; the tune measures each configuration once):",
        "",
        "| concurrency | images/request | untuned img/s | tuned img/s | untuned / tuned |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in u.get("points", []):
        lines.append(
            f"| {row['concurrency']} | {row['batch_size']} | {_f(row['untuned'])} | {_f(row['tuned'])} | "
            f"{_f(row['ratio'], '.2f')} |"
        )
    lines += ["", f"Geometric mean untuned / tuned in the tune: **{_f(u.get('geomean'), '.2f')}**."]
    if interleaved:
        i = interleaved
        lines += [
            "",
            f"The same two again in back-to-back pairs ({i['rounds']} rounds of {i['seconds']:g} s, each reloaded "
            f"with its settings; `{i['command']}`), medians (lowest-highest):",
            "",
            "| concurrency | images/request | untuned img/s | tuned img/s | untuned / tuned |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in i["points"]:
            lines.append(
                f"| {row['concurrency']} | {row['batch_size']} | {_f(row['untuned'])} | {_f(row['tuned'])} | "
                f"**{row['ratio']:.2f}** ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |"
            )
        lines += ["", f"Geometric mean untuned / tuned, back to back: **{i['geomean']:.2f}**."]
    return lines


def write(
    result: dict,
    command: str,
    tune: dict | None = None,
    results: Path = RESULTS,
    before: dict | None = None,
    notes: str | None = None,
    interleaved: dict | None = None,
) -> Path:
    """overhead-ISA.json, and this host class's section of cpu_engines.md (replaced where it is, appended
    where it is not; other hosts' sections are kept)."""
    from vitserve.perf.bench_cpu_engines import MARKDOWN, TITLE
    from vitserve.perf.report import write_section

    results.mkdir(parents=True, exist_ok=True)
    isa = result["isa"]
    (results / json_name(isa)).write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    path = results / MARKDOWN
    write_section(path, heading(isa), section(result, command, tune, before, notes, interleaved), TITLE)
    return path


def json_name(isa: str) -> str:
    return f"overhead-{isa}.json"


def heading(isa: str) -> str:
    from vitserve.perf.report import host_heading

    return host_heading(SECTION, isa)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--models", nargs="+", help="CPU backbone models of the repository")
    p.add_argument("--url", default=None, help="a running tritonserver (gRPC); default: start one here")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--results", default=str(RESULTS), help="where overhead-ISA.json and cpu_engines.md are")
    p.add_argument("--before", default=None, help="an earlier run's overhead-ISA.json, shown beside this one")
    p.add_argument("--notes", default=None, help="a Markdown file of findings, added to the section as it is")
    p.add_argument(
        "--render", default=None, metavar="OVERHEAD_JSON",
        help="measure nothing: write the section again from a run's overhead-ISA.json (its own command kept)",
    )  # fmt: skip
    p.add_argument(
        "--tune-report", default=None, help="a `vitserve tune` tune.json: its untuned/tuned summary"
    )
    p.add_argument(
        "--untuned-tuned", action="store_true",
        help="measure the --tune-report's untuned and chosen configurations back to back (untuned_tuned.json)",
    )  # fmt: skip
    p.add_argument("--untuned-json", default=None, help="an untuned_tuned.json to show with --render")
    args = p.parse_args(argv)
    if not args.models and not args.render and not args.untuned_tuned:
        p.error("give --models (CPU backbone models of the repository), or --render OVERHEAD_JSON")
    if args.untuned_tuned and not args.tune_report:
        p.error("--untuned-tuned needs --tune-report TUNE_JSON")
    import tempfile

    from vitserve.server import TritonServer

    tune = json.loads(Path(args.tune_report).read_text()) if args.tune_report else None
    before = json.loads(Path(args.before).read_text()) if args.before else None
    notes = Path(args.notes).read_text() if args.notes else None
    interleaved = json.loads(Path(args.untuned_json).read_text()) if args.untuned_json else None
    if args.render:
        result = json.loads(Path(args.render).read_text())
        path = write(result, result.pop("command"), tune, Path(args.results), before, notes, interleaved)
        print(f"wrote {path.parent / json_name(result['isa'])} and {heading(result['isa'])!r} of {path}")
        return 0
    repository = Path(args.repository)
    work = Path(tempfile.mkdtemp(prefix="vitserve-overhead-"))
    command = shlex.join(["python", "-m", "vitserve.perf.bench_overhead", *argv])
    if args.untuned_tuned:
        from vitserve.contract import Kind, backbone_model_name

        variants = {tune["current"]["variant"], tune["chosen"]["knobs"]["variant"]}
        load = [f"--load-model={backbone_model_name(tune['model'], v, Kind.CPU)}" for v in sorted(variants)]
        with TritonServer(repository, log_path=work / "tritonserver.log",
                          extra_args=["--model-control-mode=explicit", *load]) as server:  # fmt: skip
            out = untuned_vs_tuned(server.grpc_url, tune, args.rounds, args.seconds, work)
        path = Path(args.results) / "untuned_tuned.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, **out}, indent=2) + "\n")
        print(f"wrote {path}: untuned / tuned geometric mean {out['geomean']:.2f}")
        return 0
    if args.url is None:
        load = [f"--load-model={m}" for m in args.models]
        with TritonServer(repository, log_path=work / "tritonserver.log",
                          extra_args=["--model-control-mode=explicit", *load]) as server:  # fmt: skip
            result = run(server.grpc_url, repository, args.models, args.rounds, args.seconds, work)
    else:
        result = run(args.url, repository, args.models, args.rounds, args.seconds, work)
    path = write(result, command, tune, Path(args.results), before, notes, interleaved)
    print(f"wrote {path.parent / json_name(result['isa'])} and {heading(result['isa'])!r} of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
