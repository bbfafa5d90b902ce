"""Run the real perf_analyzer (tritonclient 2.51's binary) for one sweep point and parse its CSV.

perf_analyzer normally repeats measurement windows until three in a row agree within 10 %, which on a
shared CPU host can take minutes or never happen. A sweep point here must take a bounded time, so at most
three windows are taken (`--max-trials 3`) and any spread is accepted (`--stability-percentage 1000`):
perf_analyzer then reports the three windows merged. It measures each window for 1.2 x
`--measurement-interval` (seen with 2.51: request count / throughput = 3.6 x the interval), so the interval
is `duration_s / 3.6` and a point measures `duration_s` of closed-loop load, like the built-in generator.
perf_analyzer aborts on the first failed request; its own message (stderr) is passed on in the error.
"""

from __future__ import annotations

import csv
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vitserve.errors import ClientError, ConfigError
from vitserve.perf.inputs import ModelSpec, resolve_shapes
from vitserve.server import perf_analyzer_command

# where the tensors travel besides the gRPC messages (perf_analyzer --shared-memory)
SHARED_MEMORY = ("none", "system")

# perf_analyzer's CSV (2.51, `-f`): latencies and server phases are microseconds, "Inferences/Second" counts
# batch elements (request count * batch size / window), i.e. images per second for an image model.
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "images_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
}


@dataclass
class PerfAnalyzerResult:
    """One perf_analyzer run: the exact command, and its CSV row with our column names."""

    command: list[str]
    row: dict[str, float]
    stdout: str

    @property
    def images_per_s(self) -> float:
        return self.row["images_per_s"]


def perf_analyzer_args(
    url: str,
    spec: ModelSpec,
    *,
    concurrency: int,
    batch_size: int,
    duration_s: float,
    csv_path: str | Path,
    shapes: dict[str, list[int]] | None = None,
    input_data: str | Path | None = None,
    percentile: int = 99,
    shared_memory: str = "none",
) -> list[str]:
    """perf_analyzer's arguments (without the binary) for one closed-loop point over gRPC. `shared_memory`
    "system": inputs and outputs travel in system shared memory (a client on the server's host), the
    requests over gRPC."""
    if duration_s <= 0:
        raise ConfigError(f"duration_s must be > 0, got {duration_s}")
    if shared_memory not in SHARED_MEMORY:
        raise ConfigError(f"shared_memory must be one of {SHARED_MEMORY}, got {shared_memory!r}")
    spec.check_batch_size(batch_size)
    args = [
        "-m", spec.name, "-u", url, "-i", "grpc",
        "--concurrency-range", str(concurrency),
        "-b", str(batch_size),
        "--measurement-interval", str(max(100, round(duration_s * 1000 / 3.6))),
        "--max-trials", "3",
        "--stability-percentage", "1000",
        "--percentile", str(percentile),
        "-f", str(csv_path),
    ]  # fmt: skip
    resolved = resolve_shapes(spec, shapes) if input_data is None else {}
    for t in spec.inputs:
        if t.datatype == "BYTES" and input_data is None:
            raise ConfigError(
                f"input {t.name!r} of {spec.name!r} is BYTES (encoded images): perf_analyzer's random strings "
                "would fail every request; give --images DIR"
            )
        if t.name in resolved and t.datatype != "BYTES":
            args += ["--shape", f"{t.name}:{','.join(str(d) for d in resolved[t.name])}"]
    if input_data is not None:
        args += ["--input-data", str(input_data)]
    if shared_memory != "none":
        # room for every output of one request, 4-byte elements (perf_analyzer's default is 100 KiB)
        out_bytes = sum(4 * math.prod(max(1, d) for d in t.shape) for t in spec.outputs) * batch_size
        args += [
            "--shared-memory",
            shared_memory,
            "--output-shared-memory-size",
            str(max(out_bytes, 1 << 20)),
        ]
    return args


def parse_csv(path: str | Path) -> list[dict[str, float]]:
    """perf_analyzer's `-f` CSV as rows keyed by our names (`images_per_s`, `p99_us`, ...)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ClientError(
                f"perf_analyzer CSV {path} lacks columns {missing}; header: {reader.fieldnames}"
            )
        return [{ours: float(r[theirs]) for theirs, ours in CSV_COLUMNS.items()} for r in reader]


def run_perf_analyzer(
    url: str,
    spec: ModelSpec,
    *,
    concurrency: int,
    batch_size: int,
    duration_s: float,
    csv_path: str | Path,
    shapes: dict[str, list[int]] | None = None,
    input_data: str | Path | None = None,
    timeout_s: float | None = None,
    shared_memory: str = "none",
) -> PerfAnalyzerResult:
    """Run perf_analyzer for one point and return its parsed row; ClientError with its stderr on failure."""
    exe, env = perf_analyzer_command()
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.unlink(missing_ok=True)
    cmd = [
        *exe,
        *perf_analyzer_args(
            url, spec, concurrency=concurrency, batch_size=batch_size, duration_s=duration_s,
            csv_path=csv_path, shapes=shapes, input_data=input_data, shared_memory=shared_memory,
        ),
    ]  # fmt: skip
    timeout_s = timeout_s if timeout_s is not None else 3 * duration_s + 120
    where = f"model {spec.name!r} at {url}, concurrency {concurrency}, batch {batch_size}"
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise ClientError(f"perf_analyzer did not finish within {timeout_s:.0f} s ({where})") from e
    if proc.returncode != 0 or not csv_path.exists():
        message = (proc.stderr.strip() or proc.stdout.strip()[-2000:] or "(no output)").strip()
        raise ClientError(
            f"perf_analyzer failed with exit code {proc.returncode} ({where}); it stops at the first failed "
            f"request. Its message:\n{message}\ncommand: {' '.join(cmd)}"
        )
    rows = parse_csv(csv_path)
    if len(rows) != 1:
        raise ClientError(f"perf_analyzer CSV {csv_path} has {len(rows)} rows, expected 1 ({where})")
    return PerfAnalyzerResult(command=cmd, row=rows[0], stdout=proc.stdout)
