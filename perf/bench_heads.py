"""One backbone, many heads: throughput of the all-heads ensemble with 1, 2 and 4 heads vs one single-head
model, served by the real tritonserver and measured by the real perf_analyzer.

    python -m vitserve.perf.bench_heads --rounds 3 --seconds 20 --concurrency 4

Builds (RANDOM-INIT ViT-B-32, FP32, CPU kind; reused between runs from `--work`) a model `mh` with four
heads (2 linear, 1 mlp, 1 zeroshot) and a single-head model `one` (the first linear head), both with
`cpu_threads: 2`. Next to `mh` (all four heads) the repository gets the all-heads ensembles of its first 1
and 2 heads (`mh_all1`, `mh_all2`, written by the same code), and `mh_folded4`: the four heads folded
into one ONNX model (one ensemble step instead of four: the alternative layout). Every round runs every
ensemble once, in turn (interleaved: the host is shared and noisy), and each ratio is taken against the
single-head model of the same round; the table gives the median over rounds. N separate single-head
models cost N backbone passes per image: their images/s for all N tasks is the single-head model's
images/s / N on the same CPU (derived, not served: N ViT-B-32 backbones do not fit this host's 2 cores
any better than one). Nothing is asserted; results go to perf/results/heads.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vitserve.contract import Kind, Precision, backbone_model_name, head_model_name

RESULTS = Path(__file__).parent / "results"
HEADS = ("species", "defects", "tags", "colour")


def _write_heads(work: Path) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    torch.save(
        {"weight": torch.randn(10, 512, generator=g) * 0.5, "bias": torch.zeros(10)}, work / "species.pt"
    )
    torch.save(
        {"weight": torch.randn(12, 512, generator=g) * 0.5, "bias": torch.zeros(12)}, work / "colour.pt"
    )
    torch.save(
        {
            "fc1.weight": torch.randn(256, 512, generator=g) * 0.05,
            "fc1.bias": torch.zeros(256),
            "fc2.weight": torch.randn(5, 256, generator=g) * 0.1,
            "fc2.bias": torch.zeros(5),
        },
        work / "defects.pt",
    )
    return {
        "species": {"head": "linear:species.pt", "labels": [f"species-{i}" for i in range(10)]},
        "defects": {"head": "mlp:defects.pt", "labels": ["crack", "dent", "ok", "rust", "scratch"]},
        "tags": {"head": "zeroshot", "labels": ["astronaut", "cat", "cup of coffee", "rocket", "dog", "car"]},
        "colour": {"head": "linear:colour.pt", "labels": [f"colour-{i}" for i in range(12)]},
    }


def build(work: Path) -> tuple[Path, dict[str, Any]]:
    """The repository: models `mh` (4 heads) and `one` (single head), plus the extra ensembles."""
    import yaml

    from vitserve.exporter.pipeline import build_all

    work.mkdir(parents=True, exist_ok=True)
    heads = _write_heads(work)
    common = {
        "backbone": "ViT-B-32",
        "weights": "random",
        "precisions": ["fp32"],
        "kinds": ["cpu"],
        "cpu_threads": 2,
        "profile": {"min": 1, "opt": 8, "max": 16},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8, 16], "max_queue_delay_us": 2000},
    }
    (work / "species.txt").write_text("\n".join(heads["species"]["labels"]) + "\n")
    models = [
        {"name": "mh", "heads": heads, **common},
        {"name": "one", "head": "linear:species.pt", "labels": "species.txt", **common},
    ]
    config = work / "models.yaml"
    config.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    repo = work / "model_repository"
    summary = build_all(config, repo, work / "artifacts", random_init=True)
    add_ensembles(repo, config, work / "artifacts", summary)
    return repo, summary


def fold_heads(onnx_files: dict[str, Path], dst: Path) -> None:
    """One ONNX model running every head on one `features` input: outputs HEAD_logits, HEAD_probs."""
    import onnx
    from onnx import compose, helper

    nodes, inits, outputs, inp = [], [], [], None
    for h, path in onnx_files.items():
        m = compose.add_prefix(onnx.load(str(path)), f"{h}/")
        g = m.graph
        inp = inp or onnx.helper.make_tensor_value_info(
            "features",
            g.input[0].type.tensor_type.elem_type,
            ["batch", g.input[0].type.tensor_type.shape.dim[1].dim_value],
        )
        nodes.append(helper.make_node("Identity", ["features"], [g.input[0].name]))
        nodes += list(g.node)
        inits += list(g.initializer)
        for o in g.output:
            name = f"{h}_{o.name.split('/', 1)[1]}"
            nodes.append(helper.make_node("Identity", [o.name], [name]))
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(o)
            vi.name = name
            outputs.append(vi)
    graph = helper.make_graph(nodes, "folded_heads", [inp], outputs, inits)
    model = helper.make_model(
        graph, opset_imports=onnx.load(str(next(iter(onnx_files.values())))).opset_import
    )
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))


def add_ensembles(repo: Path, config: Path, artifacts: Path, summary: dict[str, Any]) -> None:
    """mh_all1 / mh_all2 (the all-heads ensemble over the first 1 / 2 heads) and mh_folded4."""
    import shutil

    from vitserve.contract import CPU_BACKBONE_SOURCE
    from vitserve.exporter.config import load_models
    from vitserve.exporter.multihead import head_config, heads_ensemble_config
    from vitserve.exporter.repository import copy_served_source, write_config

    spec = next(s for s in load_models(config) if s.name == "mh")
    backbone = summary["models"]["mh"]["triton_models"]["mh"]["backbone"]
    records = {}
    for h in HEADS:
        d = artifacts / "mh" / "heads" / h
        rec = json.loads((d / "head.json").read_text())
        records[h] = {**rec, "dir": d}
    for n in (1, 2):
        name = f"mh_all{n}"
        subset = {h: records[h] for h in HEADS[:n]}
        write_config(repo / name, heads_ensemble_config(name, spec, backbone, 512, subset, all_heads=True))
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        for h in subset:
            shutil.copy(records[h]["dir"] / "labels.txt", repo / name / f"labels_{h}.txt")
    # the folded alternative: one head model computing all four heads
    folded = "mh_folded4_heads"
    fold_heads({h: records[h]["dir"] / "model.onnx" for h in HEADS}, repo / folded / "1" / "model.onnx")
    copy_served_source(CPU_BACKBONE_SOURCE, repo / folded / "1")
    cfg = head_config(folded, spec, records[HEADS[0]])
    del cfg.output[:]
    ens = heads_ensemble_config("mh_folded4", spec, backbone, 512, records, all_heads=True)
    for o in ens.output:
        if o.name != "embeddings":
            cfg.output.add(name=o.name, data_type=o.data_type, dims=list(o.dims))
    write_config(repo / folded, cfg)
    steps = ens.ensemble_scheduling.step
    names = [v for s in steps[2:] for v in s.output_map.values()]
    del steps[3:]
    steps[2].model_name = folded
    steps[2].output_map.clear()
    for v in names:
        steps[2].output_map[v] = v
    for o in ens.output:
        o.label_filename = ""
    write_config(repo / "mh_folded4", ens)
    (repo / "mh_folded4" / "1").mkdir(parents=True, exist_ok=True)


def _images(folder: Path) -> list[Path]:
    from vitserve.exporter.samples import eval_photos

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, im in eval_photos():
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=90)
        f = folder / f"{name}.jpg"
        f.write_bytes(buf.getvalue())
        files.append(f)
    return files


def measure(repo: Path, work: Path, models: list[str], rounds: int, seconds: float, concurrency: int):
    from vitserve.perf.inputs import describe_model, write_input_data
    from vitserve.perf.perf_analyzer import run_perf_analyzer
    from vitserve.server import TritonServer

    images = _images(work / "images")
    rows: list[dict[str, Any]] = []
    command = None
    with TritonServer(repo, log_path=work / "server.log") as server:
        url = server.grpc_url.removeprefix("grpc://")
        specs = {m: describe_model(url, m) for m in models}
        data = {m: write_input_data(specs[m], images, work / f"input-{m}.json") for m in models}
        for m in models:  # warm-up, not recorded
            run_perf_analyzer(url, specs[m], concurrency=concurrency, batch_size=1, duration_s=seconds,
                              csv_path=work / "warm.csv", input_data=data[m])  # fmt: skip
        for r in range(rounds):
            for m in models:
                res = run_perf_analyzer(url, specs[m], concurrency=concurrency, batch_size=1,
                                        duration_s=seconds, csv_path=work / f"{m}.csv", input_data=data[m])  # fmt: skip
                command = command or res.command
                row = {"round": r, "model": m, **res.row, "load_avg_1m": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(
                    f"round {r} {m}: {row['images_per_s']:.2f} img/s, p50 {row['p50_us'] / 1000:.1f} ms",
                    flush=True,
                )
        stats = step_costs(url)
    return rows, command, stats


def step_costs(url: str) -> dict[str, dict[str, float]]:
    """Triton's own statistics over the whole run, per model: executions, and mean compute time per
    execution (what one ensemble step costs the server, whatever the load generator saw)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = {}
    for s in client.get_inference_statistics(as_json=True).get("model_stats", []):
        execs = int(s.get("execution_count", 0) or 0)
        infer = s.get("inference_stats", {})
        if not execs:
            continue
        compute = sum(
            int(infer.get(k, {}).get("ns", 0) or 0)
            for k in ("compute_input", "compute_infer", "compute_output")
        )
        out[s["name"]] = {
            "executions": execs,
            "requests": int(infer.get("success", {}).get("count", 0) or 0),
            "compute_ms_per_execution": compute / execs / 1e6,
        }
    client.close()
    return out


def _ratios(rows: list[dict[str, Any]], model: str, base: str) -> list[float]:
    """`model`'s images/s over `base`'s, per round (both measured in the same round)."""
    out = []
    for r in (x for x in rows if x["model"] == model):
        b = next(x for x in rows if x["model"] == base and x["round"] == r["round"])
        out.append(r["images_per_s"] / b["images_per_s"])
    return out


def summarize(rows: list[dict[str, Any]], models: list[str], base: str) -> list[dict[str, Any]]:
    out = []
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        ratios = _ratios(rows, m, base)
        to_one_head = _ratios(rows, m, "mh_all1")
        out.append(
            {
                "model": m,
                "images_per_s_median": statistics.median(r["images_per_s"] for r in mine),
                "p50_ms_median": statistics.median(r["p50_us"] for r in mine) / 1000,
                "p99_ms_median": statistics.median(r["p99_us"] for r in mine) / 1000,
                "ratio_to_single_median": statistics.median(ratios),
                "ratio_to_single_per_round": [round(x, 3) for x in ratios],
                "ratio_to_1_head_median": statistics.median(to_one_head),
            }
        )
    return out


DESCRIBE = {
    "one": "single-head model (backbone + linear head in one ONNX)",
    "mh_all1": "all-heads ensemble, 1 head",
    "mh_all2": "all-heads ensemble, 2 heads",
    "mh": "all-heads ensemble, 4 heads (one head model each)",
    "mh_folded4": "4 heads folded into one head model",
}


def write(summary, rows, host, command: str, pa_command, args, onnx_bytes: int, stats) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    single = next(s for s in summary if s["model"] == "one")
    doc = {
        "command": command,
        "perf_analyzer_command": pa_command,
        "host": host,
        "settings": vars(args),
        "summary": summary,
        "rows": rows,
        "step_costs": stats,
        "separate_models": {
            str(n): {
                "images_per_s_all_tasks": single["images_per_s_median"] / n,
                "ratio_to_single": 1 / n,
                "backbone_onnx_bytes": n * onnx_bytes,
            }
            for n in (1, 2, 4)
        },
    }
    (RESULTS / "heads.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# One backbone, many heads: throughput of the all-heads ensemble",
        "",
        f"Command: `{command}`",
        "",
        f"Host: {host['model']}; ISA: {', '.join(host['isa'])}; int8 kernels: {host['int8_isa']}; "
        f"{host['usable_cores']} usable cores (shared with other work: ratios are taken within one round).",
        "",
        "ViT-B-32, **RANDOM-INIT** weights (offline host), FP32 on the CPU kind (python backend + "
        "onnxruntime, `cpu_threads: 2`), the pip tritonserver 2.51; load by perf_analyzer 2.51 over gRPC, "
        f"batch 1, concurrency {args.concurrency}, {args.seconds:g} s per point, {args.rounds} interleaved "
        "rounds (every model once per round); JPEG bytes of the 20 bundled photographs.",
        "",
        "| ensemble | what | img/s (median) | ratio to single-head (median of per-round ratios) | per round | "
        "ratio to the 1-head ensemble (median) | p50 ms | p99 ms |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| `{s['model']}` | {DESCRIBE[s['model']]} | {s['images_per_s_median']:.2f} | "
            f"{s['ratio_to_single_median']:.3f}x | {s['ratio_to_single_per_round']} | "
            f"{s['ratio_to_1_head_median']:.3f}x | {s['p50_ms_median']:.1f} | {s['p99_ms_median']:.1f} |"
        )
    lines += [
        "",
        "**N separate single-head models** (the layout without shared backbones) run N backbone passes per "
        "image: answering all N tasks for an image costs N times the single-head model's work, so on this "
        "CPU they deliver the single-head images/s divided by N (derived from the measured single-head row, "
        "not served), and hold N backbones:",
        "",
        "| tasks N | separate models: img/s for all N tasks | ratio | backbone ONNX held |",
        "|---:|---:|---:|---:|",
    ]
    for n, d in doc["separate_models"].items():
        lines.append(
            f"| {n} | {d['images_per_s_all_tasks']:.2f} | {d['ratio_to_single']:.2f}x | "
            f"{d['backbone_onnx_bytes'] / 1e6:.0f} MB |"
        )
    loads = [r["load_avg_1m"] for r in rows]
    backbone = stats.get(backbone_model_name("mh", Precision.FP32, Kind.CPU), {}).get(
        "compute_ms_per_execution"
    )
    separate = [stats.get(head_model_name("mh", h), {}).get("compute_ms_per_execution") for h in HEADS]
    folded = stats.get("mh_folded4_heads", {}).get("compute_ms_per_execution")
    lines += [
        "",
        "**Where the time goes** (Triton's statistics over the whole run: mean compute time per execution "
        "of each step; a head model runs once per backbone execution of its ensemble):",
        "",
        "| model | executions | compute ms per execution |",
        "|---|---:|---:|",
    ]
    for name in sorted(stats):
        st = stats[name]
        if name.endswith(("_cpu", "_head", "_heads", "_preprocess")):
            lines.append(f"| `{name}` | {st['executions']} | {st['compute_ms_per_execution']:.2f} |")
    if backbone and all(separate) and folded:
        lines += [
            "",
            f"Per backbone execution ({backbone:.0f} ms), the four head models add {sum(separate):.1f} ms "
            f"({100 * sum(separate) / backbone:.1f} %) and the folded model {folded:.1f} ms "
            f"({100 * folded / backbone:.1f} %): by compute, 4 heads keep >= "
            f"{backbone / (backbone + sum(separate)):.3f}x the throughput of none, whatever the noise above.",
        ]
    lines += [
        "",
        f"Host load while measuring (1-minute load average at each point, 2 cores): min {min(loads):.1f}, "
        f"max {max(loads):.1f}. Other jobs shared the CPU, so the per-round ratios scatter; the step costs "
        "above say what the heads themselves cost.",
    ]
    lines += ["", "perf_analyzer command (one point; `-m` varies): `" + " ".join(pa_command) + "`", ""]
    (RESULTS / "heads.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from vitserve.exporter.hostinfo import cpu_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="artifacts/bench_heads", help="build folder, reused between runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="perf_analyzer time per point")
    p.add_argument("--concurrency", type=int, default=4)
    a = p.parse_args(argv)
    command = "python -m vitserve.perf.bench_heads " + " ".join(sys.argv[1:] if argv is None else argv)
    work = Path(a.work).resolve()
    t0 = time.perf_counter()
    repo, _ = build(work)
    print(f"built in {time.perf_counter() - t0:.0f} s: {repo}")
    models = ["one", "mh_all1", "mh_all2", "mh", "mh_folded4"]
    rows, pa_command, stats = measure(repo, work, models, a.rounds, a.seconds, a.concurrency)
    summary = summarize(rows, models, "one")
    onnx_bytes = (work / "artifacts" / "one" / "fp32" / "model.onnx").stat().st_size
    write(summary, rows, cpu_info(), command.strip(), pa_command, a, onnx_bytes, stats)
    print((RESULTS / "heads.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
