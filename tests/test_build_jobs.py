"""Precision variants made at once (exporter/pipeline.make_variants): the same files as made in turn, workers
that die with the build, and how many jobs a host gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitserve.errors import ConfigError
from vitserve.exporter import pipeline
from vitserve.exporter.config import ModelSpec, Precision


def test_jobs_follow_the_setting_the_cores_and_the_memory(monkeypatch):
    monkeypatch.delenv(pipeline.BUILD_JOBS_ENV, raising=False)
    monkeypatch.setattr("vitserve.exporter.triton_models.onnx_cpu.usable_cores", lambda: 4)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert pipeline.variant_jobs("3", 1, 4)[0] == 3
    assert pipeline.variant_jobs(8, 1, 2)[0] == 2  # never more than there are variants
    assert pipeline.variant_jobs("auto", 1, 3)[0] == 3  # a small export: one per core, up to the variants
    # an export so large that one variant fills the memory available: one at a time
    n, why = pipeline.variant_jobs(None, avail // pipeline.VARIANT_MEMORY_FACTOR, 4)
    assert n == 1 and "available" in why
    monkeypatch.setenv(pipeline.BUILD_JOBS_ENV, "2")
    assert pipeline.variant_jobs(None, 1, 4) == (2, "jobs 2 (asked for)")
    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError, match="expected a positive number or 'auto'"):
            pipeline.variant_jobs(bad, 1, 4)


def _tiny(root: Path, precisions: tuple[str, ...] = ("fp32", "cpu-int8", "int8")) -> tuple[ModelSpec, Path]:
    from tiny_models import tiny_backbone

    model_dir = root / "artifacts" / "m"
    tiny_backbone(model_dir / "fp32", seed=0)
    spec = ModelSpec.from_dict(
        {
            "name": "m",
            "backbone": "ViT-B-32",
            "weights": "random",
            "precisions": list(precisions),
            "calibration": {"num_images": 4},
        }
    )
    return spec, model_dir


def test_variants_made_at_once_are_the_ones_made_in_turn(tmp_path):
    """jobs 2 (worker processes) and jobs 1 (this process) write byte-identical variants with the same keys
    and gates, reported in `precisions` order."""
    files = {}
    reports = {}
    for jobs in (1, 2):
        spec, model_dir = _tiny(tmp_path / f"jobs{jobs}")
        reports[jobs] = pipeline.make_variants(spec, model_dir / "fp32", model_dir, jobs)
        files[jobs] = {
            p.relative_to(model_dir): p.read_bytes()
            for d in ("cpu-int8", "int8")
            for p in sorted((model_dir / d).rglob("*.onnx*"))
        }
    assert list(reports[2]) == [Precision.CPU_INT8, Precision.INT8]  # in `precisions` order
    for p in reports[1]:
        assert reports[2][p]["key"] == reports[1][p]["key"]
        assert reports[2][p]["passed"] == reports[1][p]["passed"]
    assert files[1].keys() == files[2].keys() and len(files[1]) >= 3
    assert [k for k in files[1] if files[1][k] != files[2][k]] == []


def test_a_killed_build_takes_its_variant_workers_with_it(tmp_path):
    """SIGKILL to the build: its workers (mid-variant) are killed too, so none goes on writing artifacts."""
    script = (
        "import multiprocessing, os, signal, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from vitserve.exporter.pipeline import _die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_die_with_parent)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    worker = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), f"worker {worker} outlived the killed build"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_copied_artifacts_folder_serves_its_own_files(tmp_path):
    """A cached variant read from artifacts that were copied elsewhere points into the copy, never back into
    the original folder (which may hold another model by then)."""
    import shutil

    spec, model_dir = _tiny(tmp_path / "a", ("fp32", "cpu-int8", "bf16"))
    first = pipeline.make_variants(spec, model_dir / "fp32", model_dir, 1)
    copy = tmp_path / "b" / "m"
    shutil.copytree(model_dir, copy)
    shutil.rmtree(tmp_path / "a")
    again = pipeline.make_variants(spec, copy / "fp32", copy, 1)
    for p, report in again.items():
        assert report["cached"] and report["key"] == first[p]["key"], p
        for field in ("onnx", "emulation"):
            if field in report:
                assert Path(report[field]).is_relative_to(copy) and Path(report[field]).is_file(), (p, field)
