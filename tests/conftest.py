"""Shared fixtures: real Triton servers, sample photographs, tier markers."""

from __future__ import annotations

import os
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


def pytest_report_header(config):
    """The host's CPU and its int8-relevant ISA, at the top of every test run."""
    from vitserve.exporter.hostinfo import cpu_summary

    return f"host CPU: {cpu_summary()}"


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


def served_backbone(repository: Path, model: str = "vitb32") -> str:
    """The backbone model the ensemble `model` routes to, as the repository's manifest records it (which
    variant passes its gate, and so is routed to, is the build's business: tests never assume it)."""
    import json

    manifest = json.loads((Path(repository) / "vitserve-manifest.json").read_text())
    return manifest["models"][model]["triton_models"][model]["backbone"]


LABELS = ["astronaut", "cat", "coffee", "rocket", "woman", "motorcycle", "camera", "cells", "dog", "car"]


@pytest.fixture(scope="session")
def linear_head(tmp_path_factory) -> tuple[Path, Path]:
    """A TAO-shaped linear head (512 -> 10) for ViT-B-32 and its labels file."""
    import torch

    d = tmp_path_factory.mktemp("head")
    g = torch.Generator().manual_seed(0)
    head = d / "head.pt"
    torch.save(
        {"fc.weight": torch.randn(len(LABELS), 512, generator=g) * 0.5, "fc.bias": torch.zeros(len(LABELS))},
        head,
    )
    labels = d / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return head, labels


def write_models_yaml(path: Path, head: Path, labels: Path, **overrides) -> Path:
    import yaml

    model = {
        "name": "vitb32",
        "backbone": "ViT-B-32",
        "weights": "random",
        "head": f"linear:{head}",
        "labels": str(labels),
        "precisions": ["fp32", "fp16", "int8", "cpu-int8"],
        "kinds": ["cpu"],
        "profile": {"min": 1, "opt": 4, "max": 8},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 20000},
        "calibration": {"num_images": 16, "method": "max"},
        "max_image_pixels": 20_000_000,
    } | overrides
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


@pytest.fixture(scope="session")
def vitb32_build(tmp_path_factory, linear_head) -> dict:
    """ViT-B-32 (random init) + linear head through the whole pipeline: export, fp16/int8/cpu-int8
    variants, and a Triton repository with the CPU kind. Shared by the exporter, precision, repository,
    client and perf tests."""
    from vitserve.exporter.pipeline import build_all

    root = tmp_path_factory.mktemp("vitb32_build")
    # preprocess_threads 2: the served ensemble tests go through the threaded preprocess path (the
    # hardened repository of test_reliability keeps the default, 1)
    # precisions/cpu_precisions: bf16 is published by default; cpu-int8 (per token: batch-invariant) only
    # where asked for, as here: the client tests go through it (issue 26)
    config = write_models_yaml(
        root / "models.yaml",
        *linear_head,
        preprocess_threads=2,
        precisions=["fp32", "fp16", "int8", "bf16", "cpu-int8"],
        cpu_precisions=["fp32", "bf16", "cpu-int8"],
    )
    # VITSERVE_TEST_ARTIFACTS: a folder kept between runs (development only; CI builds from nothing). The
    # build's own keyed caches decide what is reused, as they do for `make engines`.
    artifacts = Path(os.environ.get("VITSERVE_TEST_ARTIFACTS") or root / "artifacts")
    summary = build_all(config, root / "model_repository", artifacts, random_init=True)
    return {
        "root": root,
        "config": config,
        "repository": root / "model_repository",
        "artifacts": artifacts,
        "summary": summary,
    }


CLIP_TEXT_MODEL = "clip"  # the model of clip_text_build: ensembles `clip` (images) and `clip_text` (strings)


@pytest.fixture(scope="session")
def clip_text_build(tmp_path_factory) -> dict:
    """ViT-B-32 (random init) with a zero-shot head over LABELS and `text: true`, FP32 on the cpu kind only
    (fast): the image ensemble `clip` and the text side `clip_text` (+ clip_text_tokenize,
    clip_text_fp32_cpu). Shared by the text build/serving tests and the client/API text tests."""
    import yaml

    from vitserve.exporter.pipeline import build_all

    root = tmp_path_factory.mktemp("clip_text_build")
    model = {
        "name": CLIP_TEXT_MODEL,
        "backbone": "ViT-B-32",
        "weights": "random",
        "head": "zeroshot",
        "labels": LABELS,
        "text": True,
        "precisions": ["fp32"],
        "kinds": ["cpu"],
        "profile": {"min": 1, "opt": 4, "max": 8},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_us": 2000},
    }
    config = root / "models.yaml"
    config.write_text(yaml.safe_dump({"models": [model]}))
    artifacts = Path(os.environ.get("VITSERVE_TEST_ARTIFACTS") or root / "artifacts")
    summary = build_all(config, root / "model_repository", artifacts, random_init=True)
    return {
        "root": root,
        "config": config,
        "repository": root / "model_repository",
        "artifacts": artifacts,
        "summary": summary,
        "model": CLIP_TEXT_MODEL,
    }


@pytest.fixture(scope="session")
def clip_text_server(clip_text_build, tmp_path_factory):
    """The real tritonserver serving clip_text_build's repository (`clip`, `clip_text`)."""
    from vitserve.server import TritonServer

    log = tmp_path_factory.mktemp("logs") / "clip_text_server.log"
    with TritonServer(clip_text_build["repository"], log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def vitb32_cpu_repository(vitb32_build, linear_head) -> Path:
    """The same model with every CPU variant published (`cpu_precisions: [fp32, int8, bf16, cpu-int8]`,
    `force: true`: the random head fails int8's top-1 gate), a second repository from vitb32_build's
    artifacts (every stage cached): the CPU engines' tests (issue 26)."""
    from vitserve.exporter.pipeline import build_all

    root = vitb32_build["root"]
    config = write_models_yaml(
        root / "models.cpu.yaml",
        *linear_head,
        preprocess_threads=2,
        precisions=["fp32", "fp16", "int8", "bf16", "cpu-int8"],
        cpu_precisions=["fp32", "int8", "bf16", "cpu-int8"],
        force=True,
    )
    build_all(config, root / "repository-cpu", vitb32_build["artifacts"], random_init=True)
    return root / "repository-cpu"


@pytest.fixture(scope="session")
def vitb32_server(vitb32_build, tmp_path_factory):
    """The real tritonserver serving the ViT-B-32 repository (ensemble `vitb32`)."""
    from vitserve.server import TritonServer

    log = tmp_path_factory.mktemp("logs") / "vitb32_server.log"
    with TritonServer(vitb32_build["repository"], log_path=log) as server:
        yield server
