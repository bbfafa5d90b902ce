"""What the server saw during a measurement: Triton's statistics API as a before/after delta, and the GPU.

Triton keeps cumulative per-model counters (`get_inference_statistics`): successful requests and, for each,
the nanoseconds spent queued and in compute input/infer/output. Their difference across one sweep point
gives the average per request for that point alone, whichever load generator produced it. An ensemble's
own counters hold its scheduler's queue (near zero) and compute taken from its steps (seen with 2.51), so
each step's model is also measured on its own (`ensemble_steps`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from dataclasses import dataclass

from vitserve.errors import ServerError

_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class StatsSnapshot:
    """Cumulative counters of one model (all versions summed)."""

    success: int
    fail: int
    inferences: int
    executions: int
    ns: dict[str, int]


@dataclass(frozen=True)
class ServerBreakdown:
    """Per-request averages (microseconds) over the requests the server completed between two snapshots."""

    requests: int
    failures: int
    inferences: int
    executions: int
    queue_us: float | None
    compute_input_us: float | None
    compute_infer_us: float | None
    compute_output_us: float | None

    @property
    def avg_batch(self) -> float | None:
        """Average size of the batches the model executed (dynamic batching merges requests)."""
        return self.inferences / self.executions if self.executions else None


def ensemble_steps(config: dict) -> list[str]:
    """The composing models of an ensemble's config (as JSON), in step order, without repeats."""
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    return list(dict.fromkeys(s["model_name"] for s in steps if s.get("model_name")))


def snapshot(client, model: str) -> StatsSnapshot:
    """The model's cumulative statistics now, from a `tritonclient.grpc` client."""
    from tritonclient.utils import InferenceServerException

    try:
        stats = client.get_inference_statistics(model, as_json=True)
    except InferenceServerException as e:
        raise ServerError(f"could not read inference statistics of {model!r}: {e.message()}") from e
    success = fail = inferences = executions = 0
    ns = dict.fromkeys(_PHASES, 0)
    for s in stats.get("model_stats", []):
        inf = s.get("inference_stats", {})
        success += int(inf.get("success", {}).get("count", 0))
        fail += int(inf.get("fail", {}).get("count", 0))
        inferences += int(s.get("inference_count", 0))
        executions += int(s.get("execution_count", 0))
        for phase in _PHASES:
            ns[phase] += int(inf.get(phase, {}).get("ns", 0))
    return StatsSnapshot(success, fail, inferences, executions, ns)


def delta(before: StatsSnapshot, after: StatsSnapshot) -> ServerBreakdown:
    """Per-request averages for what happened between `before` and `after`."""
    n = after.success - before.success

    def avg(phase: str) -> float | None:
        return (after.ns[phase] - before.ns[phase]) / n / 1e3 if n > 0 else None

    return ServerBreakdown(
        requests=n,
        failures=after.fail - before.fail,
        inferences=after.inferences - before.inferences,
        executions=after.executions - before.executions,
        queue_us=avg("queue"),
        compute_input_us=avg("compute_input"),
        compute_infer_us=avg("compute_infer"),
        compute_output_us=avg("compute_output"),
    )


def have_gpu() -> bool:
    """Whether `nvidia-smi` exists and lists at least one GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


class GpuSampler:
    """Samples GPU utilization (%) and memory used (MiB) with nvidia-smi while a point runs.

    With no GPU the results stay None, so reports show null rather than a made-up zero.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.enabled = have_gpu()
        self._util: list[float] = []
        self._mem: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired, ValueError):
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
                if rows:
                    # All GPUs together: mean utilization, total memory.
                    self._util.append(sum(float(r[0]) for r in rows) / len(rows))
                    self._mem.append(sum(float(r[1]) for r in rows))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def util_pct(self) -> float | None:
        return sum(self._util) / len(self._util) if self._util else None

    @property
    def mem_used_mib(self) -> float | None:
        return max(self._mem) if self._mem else None
