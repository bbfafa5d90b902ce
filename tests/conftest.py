"""Shared fixtures: real Triton servers, sample photographs, tier markers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _have_tensorrt_gpu() -> str | None:
    """None when TensorRT and a CUDA GPU are present, else the reason to skip."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (it cannot be installed on CPU-only hosts; see README)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        return "torch is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _have_tensorrt_gpu() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """A repository with one python-backend model, `add_one` (FP32 [-1, 4] -> FP32 [-1, 4])."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repo = tmp_path_factory.mktemp("tiny_repo")
    model = repo / "add_one"
    (model / "1").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "add_one_model.py", model / "1" / "model.py")
    cfg = mc.ModelConfig(name="add_one", backend="python", max_batch_size=8)
    cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[4])
    cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[4])
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.dynamic_batching.max_queue_delay_microseconds = 100
    (model / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return repo


@pytest.fixture(scope="session")
def tiny_server(tiny_repository, tmp_path_factory):
    """One real tritonserver per session on the tiny repository, on free ports."""
    from vitserve.server import TritonServer

    log = tmp_path_factory.mktemp("logs") / "tiny_server.log"
    with TritonServer(tiny_repository, log_path=log) as server:
        yield server
