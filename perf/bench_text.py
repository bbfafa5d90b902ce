"""The text side's two performance targets, on the real tritonserver: (a) text embeddings served by `NAME_text`
against in-process onnxruntime on the same text ONNX file, both at batch 32 (target >= 0.9x); (b) the p50 of
an 8-image request through `vitserve api` against the same request sent straight to Triton over gRPC (target:
the API adds <= 10 %).

    python -m vitserve.perf.bench_text --rounds 5 --seconds 10 --requests 40

Builds (reused from `--work`) ViT-B-32 RANDOM-INIT with `text: true`, FP32 on the CPU kind (the test fixture's
model), starts tritonserver on free ports and, for (b), `vitserve api --open` in its own process group on
127.0.0.1. (a) Served: requests of 32 sentences to `NAME_text` (tokenized by the server) from `--concurrency`
gRPC clients for `--seconds`; in-process: one onnxruntime session with every usable core on the served
model's own `model.onnx`, fed the served tokenizer's tokens of the same 32 sentences, for as long. (b) One
request at a time, alternating direct and API (the order flips every pair), `--requests` of each after a
warm-up: the direct call is tritonclient's gRPC `infer` of the 8 JPEGs on the ensemble; the API call is an
HTTP POST of the same 8 JPEGs as data URLs with `encoding_format: base64` (what the `openai` client asks for).
The host is shared: everything is interleaved in rounds and the ratios are per round (median reported); the
load average is recorded. Nothing is asserted; results go to perf/results/text.{md,json}.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.api import running as api_process
from vitserve.contract import (
    EMBEDDINGS,
    IMAGE_INPUT,
    ONNX_FILE,
    TEXT_INPUT,
    TOKENS,
    Kind,
    Precision,
    backbone_model_name,
    text_model_name,
    tokenizer_model_name,
)

RESULTS = Path(__file__).parent / "results"
NAME = "clip"
TEXT_BATCH = 32
IMAGES_PER_REQUEST = 8


def build(work: Path, artifacts: Path) -> Path:
    """The repository: ViT-B-32 random init, zero-shot head, `text: true`, FP32, CPU kind."""
    import yaml

    from vitserve.exporter.pipeline import build_all

    work.mkdir(parents=True, exist_ok=True)
    model = {
        "name": NAME,
        "backbone": "ViT-B-32",
        "weights": "random",
        "head": "zeroshot",
        "labels": [
            "astronaut",
            "cat",
            "coffee",
            "rocket",
            "woman",
            "motorcycle",
            "camera",
            "cells",
            "dog",
            "car",
        ],
        "text": True,
        "precisions": ["fp32"],
        "kinds": ["cpu"],
        "profile": {"min": 1, "opt": 4, "max": IMAGES_PER_REQUEST},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 2000},
    }
    config = work / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [model]}, sort_keys=False))
    repo = work / "model_repository"
    build_all(config, repo, artifacts, random_init=True)
    return repo


def sentences(n: int = TEXT_BATCH) -> list[str]:
    """`n` distinct real sentences (the text export's parity sentences, numbered past the first round)."""
    from vitserve.exporter.text import PARITY_SENTENCES

    base = list(PARITY_SENTENCES)
    return [base[i % len(base)] + ("" if i < len(base) else f" (#{i})") for i in range(n)]


def jpeg_images(n: int = IMAGES_PER_REQUEST) -> list[bytes]:
    """`n` held-out photographs (views beyond the bundled ones are crops/flips) as JPEG bytes."""
    from vitserve.exporter.samples import eval_views

    out = []
    for _, im in eval_views(n):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _text_input(grpcclient, texts: list[str]):
    data = np.array([[t.encode()] for t in texts], dtype=object)
    inp = grpcclient.InferInput(TEXT_INPUT, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    return inp


def served_text_rate(url: str, texts: list[str], seconds: float, concurrency: int) -> float:
    """Texts per second through NAME_text, `concurrency` gRPC clients each sending requests of `texts`."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
    model = text_model_name(NAME)
    done = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        inp = _text_input(grpcclient, texts)
        out = grpcclient.InferRequestedOutput(EMBEDDINGS)
        while time.perf_counter() < stop:
            clients[k].infer(model, [inp], outputs=[out])
            done[k] += len(texts)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    return sum(done) / elapsed


def inprocess_text_rate(session, tokens: np.ndarray, seconds: float) -> float:
    """Texts per second of onnxruntime on `tokens` (one batch per run)."""
    name = session.get_inputs()[0].name
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, {name: tokens})
        n += len(tokens)
    return n / (time.perf_counter() - t0)


def api_vs_direct(url: str, api: str, images: list[bytes], requests: int, warmup: int = 3) -> dict[str, Any]:
    """Latencies (ms) of the same 8-image request, direct gRPC and through the API, alternating."""
    import httpx
    import tritonclient.grpc as grpcclient

    direct = grpcclient.InferenceServerClient(url)
    data = np.array([[b] for b in images], dtype=object)
    inp = grpcclient.InferInput(IMAGE_INPUT, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    out = grpcclient.InferRequestedOutput(EMBEDDINGS)
    body = json.dumps(
        {
            "model": NAME,
            "input": ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in images],
            "encoding_format": "base64",
        }
    ).encode()
    http = httpx.Client(base_url=api, timeout=120, headers={"Content-Type": "application/json"})
    got = {}

    def call_direct() -> float:
        t0 = time.perf_counter()
        got["direct"] = direct.infer(NAME, [inp], outputs=[out]).as_numpy(EMBEDDINGS)
        return (time.perf_counter() - t0) * 1e3

    def call_api() -> float:
        t0 = time.perf_counter()
        r = http.post("/v1/embeddings", content=body)
        ms = (time.perf_counter() - t0) * 1e3
        r.raise_for_status()
        got["api"] = np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
        )
        return ms

    for _ in range(warmup):
        call_direct()
        call_api()
    lat: dict[str, list[float]] = {"direct": [], "api": []}
    for i in range(requests):
        pair = (("direct", call_direct), ("api", call_api))
        for key, fn in pair if i % 2 == 0 else pair[::-1]:
            lat[key].append(fn())
    a, b = got["direct"].astype(np.float64), got["api"].astype(np.float64)
    cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    direct.close()
    http.close()
    return {"latency_ms": lat, "cosine_min": cos}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(repo: Path, work: Path, rounds: int, seconds: float, concurrency: int, requests: int) -> dict:
    import tritonclient.grpc as grpcclient

    from vitserve.exporter import onnxrt
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.server import TritonServer

    texts = sentences()
    onnx_path = repo / backbone_model_name(text_model_name(NAME), Precision.FP32, Kind.CPU) / "1" / ONNX_FILE
    session = onnxrt.cpu_session(onnx_path, threads=usable_cores())
    load = {"start": os.getloadavg()}
    text_rounds = []
    with TritonServer(repo, log_path=work / "triton.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        result = client.infer(
            tokenizer_model_name(NAME),
            [_text_input(grpcclient, texts)],
            outputs=[grpcclient.InferRequestedOutput(TOKENS)],
        )
        tokens = result.as_numpy(TOKENS)
        served = client.infer(text_model_name(NAME), [_text_input(grpcclient, texts)]).as_numpy(EMBEDDINGS)
        client.close()
        name = session.get_inputs()[0].name
        local = session.run(None, {name: tokens})[0]
        text_cos = float(
            ((served * local).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(local, axis=1)).min()
        )
        served_text_rate(server.grpc_url, texts, 2.0, concurrency)  # warm-up
        inprocess_text_rate(session, tokens, 2.0)
        for r in range(rounds):
            order = ("served", "in-process") if r % 2 == 0 else ("in-process", "served")
            row = {}
            for what in order:
                if what == "served":
                    row["served"] = served_text_rate(server.grpc_url, texts, seconds, concurrency)
                else:
                    row["in_process"] = inprocess_text_rate(session, tokens, seconds)
            row["ratio"] = row["served"] / row["in_process"]
            text_rounds.append(row)
            print(f"round {r + 1}: served {row['served']:.1f} texts/s, in-process {row['in_process']:.1f}, "
                  f"ratio {row['ratio']:.3f}", flush=True)  # fmt: skip
        load["after_text"] = os.getloadavg()
        del session
        images = jpeg_images()
        with api_process(server.grpc_url, work / "api.log", "--open") as api:
            api_rounds = []
            per_round = max(1, requests // rounds)
            for r in range(rounds):
                res = api_vs_direct(server.grpc_url, api, images, per_round)
                lat = res["latency_ms"]
                row = {
                    "direct_p50_ms": _pct(lat["direct"], 50),
                    "api_p50_ms": _pct(lat["api"], 50),
                    "direct_p90_ms": _pct(lat["direct"], 90),
                    "api_p90_ms": _pct(lat["api"], 90),
                    "cosine_min": res["cosine_min"],
                    "latency_ms": lat,
                }
                row["overhead"] = row["api_p50_ms"] / row["direct_p50_ms"] - 1
                api_rounds.append(row)
                print(f"round {r + 1}: direct p50 {row['direct_p50_ms']:.1f} ms, API p50 {row['api_p50_ms']:.1f} ms, "
                      f"overhead {100 * row['overhead']:+.1f} %", flush=True)  # fmt: skip
        load["end"] = os.getloadavg()
    all_direct = [x for r in api_rounds for x in r["latency_ms"]["direct"]]
    all_api = [x for r in api_rounds for x in r["latency_ms"]["api"]]
    return {
        "text": {
            "batch": TEXT_BATCH,
            "concurrency": concurrency,
            "rounds": text_rounds,
            "ratio_median": statistics.median(r["ratio"] for r in text_rounds),
            "served_median": statistics.median(r["served"] for r in text_rounds),
            "in_process_median": statistics.median(r["in_process"] for r in text_rounds),
            "served_vs_in_process_cosine_min": text_cos,
            "onnx": str(onnx_path.relative_to(repo)),
        },
        "api": {
            "images_per_request": IMAGES_PER_REQUEST,
            "requests_each": per_round * rounds,
            "rounds": [{k: v for k, v in r.items() if k != "latency_ms"} for r in api_rounds],
            "overhead_median": statistics.median(r["overhead"] for r in api_rounds),
            "direct_p50_ms": _pct(all_direct, 50),
            "api_p50_ms": _pct(all_api, 50),
            "overhead_pooled": _pct(all_api, 50) / _pct(all_direct, 50) - 1,
            "cosine_min": min(r["cosine_min"] for r in api_rounds),
            "image_bytes": [len(b) for b in images],
        },
        "load_average": load,
    }


def write(result: dict, command: str, host: str, cores: int) -> None:
    t, a = result["text"], result["api"]
    load = {k: tuple(round(x, 1) for x in v) for k, v in result["load_average"].items()}
    loaded = max(max(v) for v in load.values()) > cores
    lines = [
        "# The text side: served text embeddings vs in-process, and the API's overhead",
        "",
        f"Command: `{command}`",
        "",
        f"Host: {host}. Load average (1, 5, 15 min) at start {load['start']}, after (a) {load['after_text']}, "
        f"at the end {load['end']}"
        + (
            f": **the host was loaded** (load above its {cores} cores, other agents' jobs): numbers are per round, "
            "interleaved, ratios taken within a round."
            if loaded
            else "."
        ),
        "",
        "ViT-B-32 **RANDOM-INIT** weights (offline host), `text: true`, FP32 on the CPU kind (python backend + "
        "onnxruntime), the pip tritonserver 2.51.",
        "",
        f"## (a) Text embeddings at batch {t['batch']}: served `{text_model_name(NAME)}` vs in-process onnxruntime",
        "",
        f"Served: gRPC requests of {t['batch']} sentences to the ensemble `{text_model_name(NAME)}` (server-side "
        f"tokenization, then the text backbone), {t['concurrency']} clients at once. In-process: one onnxruntime "
        f"session, every usable core, on the served file `{t['onnx']}` at batch {t['batch']}, fed the served "
        "tokenizer's tokens of the same sentences. Target: >= 0.9x.",
        "",
        "| round | served texts/s | in-process texts/s | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(t["rounds"], 1):
        lines.append(f"| {i} | {r['served']:.1f} | {r['in_process']:.1f} | {r['ratio']:.3f}x |")
    lines += [
        f"| **median** | {t['served_median']:.1f} | {t['in_process_median']:.1f} | **{t['ratio_median']:.3f}x** |",
        "",
        f"Served vs in-process embeddings of the 32 sentences: cosine min {t['served_vs_in_process_cosine_min']:.7f}.",
        "",
        f"## (b) An {a['images_per_request']}-image request: `vitserve api` vs a direct gRPC call",
        "",
        f"The same {a['images_per_request']} JPEGs ({min(a['image_bytes']) // 1024}-{max(a['image_bytes']) // 1024} "
        f"KiB) to the ensemble `{NAME}`: direct = tritonclient gRPC `infer`; API = HTTP POST /v1/embeddings with "
        "the images as data URLs, `encoding_format: base64` (the API decodes them and sends one gRPC request of "
        f"{a['images_per_request']} to Triton). One request at a time, alternating, {a['requests_each']} of each "
        "after a warm-up. Target: the API adds <= 10 % to the p50.",
        "",
        "| round | direct p50 ms | API p50 ms | direct p90 ms | API p90 ms | API overhead (p50) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(a["rounds"], 1):
        lines.append(
            f"| {i} | {r['direct_p50_ms']:.1f} | {r['api_p50_ms']:.1f} | {r['direct_p90_ms']:.1f} | "
            f"{r['api_p90_ms']:.1f} | {100 * r['overhead']:+.1f} % |"
        )
    lines += [
        f"| **all requests** | {a['direct_p50_ms']:.1f} | {a['api_p50_ms']:.1f} | | | "
        f"**{100 * a['overhead_pooled']:+.1f} %** (median of rounds {100 * a['overhead_median']:+.1f} %) |",
        "",
        f"API vs direct embeddings: cosine min {a['cosine_min']:.7f}.",
        "",
        "Notes. (a) The served path includes the server-side tokenization; the in-process one does not. The "
        "served text backbone (`onnx_cpu.py`, `cpu_lanes: auto`) runs a batch as one 1-thread slice per core "
        "at once, the in-process baseline is one multi-threaded session, which waits on whichever core "
        'another process holds: on a loaded host the served side can come out ahead (README "Lanes"). '
        "(b) What the API adds per request (reading the JSON body, base64-decoding the images, the HTTP hop, "
        "encoding the answer) is not resolved here beyond the shared host's round-to-round spread "
        f"({100 * min(r['overhead'] for r in a['rounds']):+.1f} % to "
        f"{100 * max(r['overhead'] for r in a['rounds']):+.1f} % per round) against the seconds of backbone "
        "work an 8-image request costs on these 2 cores.",
        "",
    ]
    (RESULTS / "text.md").write_text("\n".join(lines))
    (RESULTS / "text.json").write_text(
        json.dumps(result | {"command": command, "host": host}, indent=1) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    from vitserve.exporter.hostinfo import cpu_info, cpu_summary

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="artifacts/bench_text", help="build folder, reused between runs")
    p.add_argument("--artifacts", default=None, help="the build's artifacts (default WORK/artifacts)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0, help="(a): seconds per side per round")
    p.add_argument("--concurrency", type=int, default=2, help="(a): gRPC clients sending text at once")
    p.add_argument("--requests", type=int, default=40, help="(b): requests of each kind, over all rounds")
    a = p.parse_args(argv)
    command = "python -m vitserve.perf.bench_text " + " ".join(sys.argv[1:] if argv is None else argv)
    work = Path(a.work).resolve()
    t0 = time.perf_counter()
    repo = build(work, Path(a.artifacts).resolve() if a.artifacts else work / "artifacts")
    print(f"built in {time.perf_counter() - t0:.0f} s: {repo}", flush=True)
    result = measure(repo, work, a.rounds, a.seconds, a.concurrency, a.requests)
    write(result, command.strip(), cpu_summary(), cpu_info()["usable_cores"])
    print((RESULTS / "text.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
