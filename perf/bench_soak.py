"""Soak: the CPU ensemble at saturation for a bounded time, counting every failed request and sampling memory.

    python perf/bench_soak.py --repository model_repository                  # 10 minutes, starts a server
    python perf/bench_soak.py --repository model_repository --duration-s 120 --concurrency 8

The built-in closed-loop generator (`perf.loadgen.run_load`, gRPC streams) sends JPEG photographs to the
ensemble `--model` with `--concurrency` requests in flight, in back-to-back windows of `--window-s`, so
throughput and failures are seen over time and not only in total. Every `--sample-s` the resident memory
(VmRSS from /proc/PID/status, no psutil) of tritonserver and of each python-backend stub
(`triton_python_backend_stub`, one per model instance) is recorded. The run passes when no request failed
and no process grew by more than `--max-growth-pct` between the mid-point of the run and its end (the
first half is warm-up: allocators, onnxruntime arenas and gRPC buffers reach their working size there).
Writes perf/results/soak.json and soak.md with the exact command. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitserve.exporter.hostinfo import cpu_summary

RESULTS = Path(__file__).resolve().parent / "results"


def rss_kb(pid: int) -> dict[str, int] | None:
    """VmRSS of `pid` and its parts RssAnon (heap: where a leak shows) and RssShmem (the python backend's
    shared-memory pool, mapped by tritonserver and the stub alike), in KiB, from /proc/PID/status; None
    when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in _RSS}
    return {_RSS[k]: v for k, v in fields.items()} if "VmRSS" in fields else None


_RSS = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}


@dataclass
class Sampler:
    """Samples the RSS of tritonserver and its stubs every `every_s` in a background thread."""

    server_pid: int
    every_s: float
    t0: float = field(default_factory=time.monotonic)
    samples: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        from vitserve.supervisor import stub_processes

        procs = {"tritonserver": self.server_pid} | {
            s.instance: s.pid for s in stub_processes(self.server_pid)
        }
        rss = {name: rss_kb(pid) for name, pid in procs.items()}
        rss = {k: v for k, v in rss.items() if v}
        self.samples.append(
            {
                "t_s": round(time.monotonic() - self.t0, 2),
                "rss_kb": {k: v["rss"] for k, v in rss.items()},
                "anon_kb": {k: v.get("anon") for k, v in rss.items()},
                "shmem_kb": {k: v.get("shmem") for k, v in rss.items()},
            }
        )

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> Sampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def memory_growth(samples: list[dict], duration_s: float) -> dict[str, dict]:
    """Per process: RSS at the mid-point, at the end, its peak after the mid-point, growth in % of the
    mid-point value (end and peak), the least-squares slope over the second half (MiB/min), and how much
    of the mid->end change is heap (RssAnon) and shared memory (RssShmem)."""
    mid_t = duration_s / 2.0
    names = sorted({n for s in samples for n in s["rss_kb"]})
    out = {}
    for name in names:
        series = [(s["t_s"], s["rss_kb"][name]) for s in samples if name in s["rss_kb"]]
        second = [(t, v) for t, v in series if t >= mid_t]
        if len(second) < 2:
            continue
        mid, end = second[0][1], second[-1][1]
        peak = max(v for _, v in second)
        t = np.array([x for x, _ in second]) / 60.0
        v = np.array([y for _, y in second]) / 1024.0
        slope = float(np.polyfit(t, v, 1)[0]) if np.ptp(t) > 0 else 0.0
        out[name] = {
            "start_mib": round(series[0][1] / 1024.0, 1),
            "mid_mib": round(mid / 1024.0, 1),
            "end_mib": round(end / 1024.0, 1),
            "peak_after_mid_mib": round(peak / 1024.0, 1),
            "growth_end_pct": round(100.0 * (end - mid) / mid, 2),
            "growth_peak_pct": round(100.0 * (peak - mid) / mid, 2),
            "slope_second_half_mib_per_min": round(slope, 3),
        }
        for part in ("anon", "shmem"):
            values = [(s["t_s"], s.get(f"{part}_kb", {}).get(name)) for s in samples]
            values = [v for t, v in values if t >= mid_t and v is not None]
            if len(values) >= 2:
                out[name][f"{part}_change_mib"] = round((values[-1] - values[0]) / 1024.0, 1)
    return out


def _jpegs(count: int) -> list[bytes]:
    from vitserve.exporter.samples import eval_views

    blobs = []
    for _, im in eval_views(count):
        b = io.BytesIO()
        im.convert("RGB").save(b, format="JPEG", quality=90)
        blobs.append(b.getvalue())
    return blobs


def soak(
    url: str,
    model: str,
    server_pid: int,
    *,
    duration_s: float,
    window_s: float,
    concurrency: int,
    sample_s: float,
    images: int,
) -> dict:
    """Run the load for `duration_s` in windows and sample memory; returns the result record."""
    from vitserve.perf.inputs import describe_model
    from vitserve.perf.loadgen import run_load

    spec = describe_model(url, model)
    blobs = _jpegs(images)
    payloads = [{"image": np.array([[b]], dtype=np.object_)} for b in blobs]
    sampler = Sampler(server_pid, sample_s).start()
    windows = []
    t_start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - t_start) < duration_s:
            length = min(window_s, duration_s - elapsed)
            if length < 1.0:
                break
            r = run_load(url, spec, payloads, concurrency=concurrency, duration_s=length, warmup_s=0.0)
            p = r.percentiles_us()
            windows.append(
                {
                    "t_end_s": round(time.monotonic() - t_start, 1),
                    "window_s": round(r.window_s, 2),
                    "requests": r.requests,
                    "failures": r.failures,
                    "images_per_s": round(r.images_per_s, 2),
                    "p50_ms": round(p[50] / 1e3, 1),
                    "p99_ms": round(p[99] / 1e3, 1),
                    "errors": r.errors,
                }
            )
            print(
                f"[{windows[-1]['t_end_s']:7.1f} s] {r.requests:5d} ok {r.failures:3d} failed "
                f"{r.images_per_s:6.2f} img/s p50 {p[50] / 1e3:7.1f} ms  p99 {p[99] / 1e3:7.1f} ms  "
                f"tritonserver {sampler.samples[-1]['rss_kb'].get('tritonserver', 0) / 1024:.0f} MiB",
                flush=True,
            )
    finally:
        sampler.stop()
    wall_s = time.monotonic() - t_start
    requests = sum(w["requests"] for w in windows)
    failures = sum(w["failures"] for w in windows)
    growth = memory_growth(sampler.samples, wall_s)
    return {
        "model": model,
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(wall_s, 1),
        "requests": requests,
        "failures": failures,
        "images_per_s": round(requests / max(sum(w["window_s"] for w in windows), 1e-9), 2),
        "errors": sorted({e for w in windows for e in w["errors"]}),
        "windows": windows,
        "memory": growth,
        "rss_samples": sampler.samples,
    }


def served_model(repository: str | Path, model: str) -> dict:
    """What the repository's manifest says about `model`: backbone, weights, the backbone the ensemble
    routes to, batching. Empty when there is no manifest."""
    path = Path(repository) / "vitserve-manifest.json"
    if not path.exists():
        return {}
    entry = json.loads(path.read_text()).get("models", {}).get(model, {})
    config, export = entry.get("config", {}), entry.get("export", {})
    return {
        "backbone": export.get("backbone"),
        "weights": export.get("weights"),
        "serves": entry.get("triton_models", {}).get(model, {}).get("backbone"),
        "profile": config.get("profile"),
        "dynamic_batching": config.get("dynamic_batching"),
        "instances": config.get("instances"),
    }


def _markdown(record: dict, command: str, max_growth_pct: float) -> str:
    lines = [
        "# Soak: CPU ensemble at saturation",
        "",
        f"Command: `{command}`  ",
        f"Date: {record['date']}; host: {record['host']['cpus']} CPUs, {record['host']['platform']} "
        f"({record['host'].get('cpu', 'CPU not recorded')}); "
        f"server: {record['server']}",
        "",
        f"- model `{record['model']}`, {record['concurrency']} requests in flight (closed loop, gRPC streams, "
        f"one JPEG per request), {record['duration_s']:.0f} s",
        f"- **{record['requests']} requests, {record['failures']} failed**; "
        f"{record['images_per_s']:.2f} images/s on average",
        f"- verdict: **{record['verdict']}** (zero failures, and RSS growth from the mid-point to the end "
        f"under {max_growth_pct:g} % for every process)",
    ]
    if record.get("served"):
        m = record["served"]
        lines[5:5] = [
            f"Served: {m['backbone']} ({m['weights']}), ensemble -> `{m['serves']}`, batch profile "
            f"{m['profile']}, dynamic batching {m['dynamic_batching']}, {m['instances']} instance(s) per model",
            "",
        ]
    if record["errors"]:
        lines.append(f"- first error messages: {record['errors'][:5]}")
    lines += [
        "",
        "| process | start MiB | mid MiB | end MiB | peak after mid MiB | growth mid->end % | growth mid->peak % "
        "| slope 2nd half MiB/min | mid->end heap (RssAnon) MiB | mid->end shm (RssShmem) MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g in record["memory"].items():
        lines.append(
            f"| {name} | {g['start_mib']} | {g['mid_mib']} | {g['end_mib']} | {g['peak_after_mid_mib']} | "
            f"{g['growth_end_pct']} | {g['growth_peak_pct']} | {g['slope_second_half_mib_per_min']} | "
            f"{g.get('anon_change_mib', '')} | {g.get('shmem_change_mib', '')} |"
        )
    lines += [
        "",
        "Throughput and latency per window (client side):",
        "",
        "| end s | requests | failed | images/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for w in record["windows"]:
        lines.append(
            f"| {w['t_end_s']} | {w['requests']} | {w['failures']} | {w['images_per_s']} | {w['p50_ms']} "
            f"| {w['p99_ms']} |"
        )
    lines += [
        "",
        "RSS is VmRSS from /proc/PID/status, sampled every "
        f"{record['sample_s']:g} s (all samples in soak.json). A throughput figure from a host shared "
        "with other work is indicative only.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="served by a tritonserver started here")
    p.add_argument("--model", default="vitb32", help="the ensemble taking encoded images")
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--window-s", type=float, default=30.0, help="throughput/failure reporting window")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (saturates 2 cores)")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--images", type=int, default=16, help="distinct JPEG photographs cycled")
    p.add_argument("--max-growth-pct", type=float, default=5.0)
    p.add_argument("--out", default=str(RESULTS / "soak"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    from vitserve.server import TritonServer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python perf/bench_soak.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    with TritonServer(args.repository) as server:
        record = soak(
            server.grpc_url,
            args.model,
            server.process.pid,
            duration_s=args.duration_s,
            window_s=args.window_s,
            concurrency=args.concurrency,
            sample_s=args.sample_s,
            images=args.images,
        )
    grew = {
        n: g["growth_end_pct"]
        for n, g in record["memory"].items()
        if g["growth_end_pct"] >= args.max_growth_pct
    }
    record |= {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "cpu": cpu_summary(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "server": "tritonserver 2.51 (nvidia-pytriton wheel, python backend, CPU)",
        "server_log": str(server.log_path),
        "repository": str(args.repository),
        "served": served_model(args.repository, args.model),
        "sample_s": args.sample_s,
        "max_growth_pct": args.max_growth_pct,
        "grew": grew,
        "verdict": "PASS" if record["failures"] == 0 and not grew and record["requests"] > 0 else "FAIL",
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(out.with_suffix(".json"))
    md = out.with_suffix(".md.tmp")
    md.write_text(_markdown(record, command, args.max_growth_pct))
    md.rename(out.with_suffix(".md"))
    print(
        f"{record['verdict']}: {record['requests']} requests, {record['failures']} failed, "
        f"{record['images_per_s']:.2f} img/s; memory growth mid->end %: "
        + ", ".join(f"{n} {g['growth_end_pct']}" for n, g in record["memory"].items())
        + f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}"
    )
    return 0 if record["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
