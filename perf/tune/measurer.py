"""A configuration -> its points: served (reloaded and checked), warmed up and measured at every workload
point, kept in `measurements.jsonl` so that a rerun resumes.

Each point is measured by `vitserve.perf.measure.measure_point` (perf_analyzer, Triton's statistics around
it), the primitive `vitserve perf` measures with, stretched on a slow or shared host.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from vitserve.errors import ConfigError, ServerError, VitServeError
from vitserve.perf.tune.configs import Reloader, Target
from vitserve.perf.tune.search import KNOBS_VERSION, Knobs, Point

log = logging.getLogger(__name__)

MEASUREMENTS = "measurements.jsonl"


def signature(target_model: str, batch_size: int | list[int], duration_s: float, host: str) -> dict[str, Any]:
    """What a stored point must share with this run to be reused."""
    return {"model": target_model, "batch_size": batch_size, "duration_s": duration_s, "host": host,
            "knobs": KNOBS_VERSION}  # fmt: skip


def load_earlier(path: Path, sig: dict[str, Any]) -> list[Point]:
    """Points of `measurements.jsonl` measured with the same settings (others are left in the file)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                p = Point.from_json(line)
                if {k: p.signature.get(k) for k in sig} == sig:
                    out.append(p)
    return out


class Measurer:
    """Measures configurations on a running server: reload, warm up, perf_analyzer, Triton statistics."""

    def __init__(self, url, client, target: Target, reloader: Reloader, *, tensor, concurrencies, batch_sizes,
                 duration_s, warmup_s, images, raw_dir, sig):  # fmt: skip
        self.url, self.client, self.target, self.reloader = url, client, target, reloader
        self.tensor, self.concurrencies, self.batch_sizes = tensor, concurrencies, list(batch_sizes)
        self.duration_s, self.warmup_s, self.images, self.raw_dir, self.sig = (
            duration_s, warmup_s, images, raw_dir, sig,
        )  # fmt: skip
        self._input_data: dict[str, Path] = {}

    def __call__(self, knobs: Knobs, stage: str, *, tensor: bool | None = None, batch_size: int | None = None,
                 concurrencies: list[int] | None = None, shared_memory: str = "none") -> list[Point]:  # fmt: skip
        tensor = self.tensor if tensor is None else tensor
        workload = [
            (c, b) for b in ([batch_size] if batch_size else self.batch_sizes) for c in concurrencies or self.concurrencies
        ]  # fmt: skip
        model = self.target.measured(knobs, tensor)
        try:
            self.reloader.apply(knobs)
        except ServerError as e:
            return [
                Point(
                    knobs, stage, model, c, b, error=str(e), signature=self.sig, shared_memory=shared_memory
                )
                for c, b in workload
            ]
        return [self.point(knobs, stage, model, c, b, shared_memory) for c, b in workload]

    def point(self, knobs: Knobs, stage: str, model: str, concurrency: int, batch: int,
              shared_memory: str = "none") -> Point:  # fmt: skip
        from vitserve.perf.inputs import describe_model, make_payloads, write_input_data
        from vitserve.perf.measure import Generator, measure_point

        point = Point(
            knobs, stage, model, concurrency, batch, signature=self.sig, shared_memory=shared_memory
        )
        try:
            spec = describe_model(self.url, model)
            input_data = None
            if any(t.datatype == "BYTES" for t in spec.inputs):
                if self.images is None:
                    raise ConfigError(f"{model!r} takes encoded images: give --images DIR")
                if model not in self._input_data:
                    self._input_data[model] = write_input_data(
                        spec, self.images, self.raw_dir / f"input_{model}.json"
                    )
                input_data = self._input_data[model]
            m = measure_point(
                self.url, spec, generator=Generator.PERF_ANALYZER, concurrency=concurrency, batch_size=batch,
                duration_s=self.duration_s, warmup_s=self.warmup_s,
                payloads=make_payloads(spec, batch, images=self.images, count=2), input_data=input_data,
                csv_path=self.raw_dir / f"pa_{model}_b{batch}_c{concurrency}_{shared_memory}.csv",
                shared_memory=shared_memory, stretch=True, client=self.client,
            )  # fmt: skip
        except VitServeError as e:
            point.error = str(e)
            log.error("%s at concurrency %d: %s", knobs.key(), concurrency, e)
            return point
        point.duration_s = m.duration_s
        point.images_per_s = m.images_per_s
        point.p50_us = m.percentiles_us[50]
        point.p99_us = m.percentiles_us[99]
        point.server = {name: m.server_row(name) for name in m.server}
        return point
