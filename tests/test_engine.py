"""Engine stage: settings, trtexec command, build.sh, and (on GPU hosts) a real strongly typed build."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vitserve.errors import ConfigError, ExportError
from vitserve.exporter import engine
from vitserve.exporter.config import BatchProfile
from vitserve.exporter.engine import (
    EngineSettings,
    build_engine,
    check_profile,
    run_engine,
    trtexec_command,
    write_build_script,
)

CHW = (3, 224, 224)


def settings(**kw) -> EngineSettings:
    return EngineSettings(profile=BatchProfile(1, 8, 16), **kw)


# -- profile and settings -------------------------------------------------------------------------


def test_profile_ordering_refused_with_numbers():
    with pytest.raises(ConfigError, match=r"min=9 opt=8 max=16"):
        BatchProfile.parse("9,8,16")
    with pytest.raises(ConfigError, match=r"min=1 opt=17 max=16"):
        BatchProfile.parse([1, 17, 16])


def test_profile_above_model_max_batch_refused_with_numbers():
    with pytest.raises(ConfigError, match=r"max=16 is above the model's max batch size 8"):
        check_profile(BatchProfile(1, 4, 16), max_batch_size=8)
    check_profile(BatchProfile(1, 4, 16), max_batch_size=16)


def test_build_engine_checks_profile_before_anything(tmp_path):
    plan = tmp_path / "m" / "1" / "model.plan"
    with pytest.raises(ConfigError, match=r"max=16 .* max batch size 4"):
        build_engine(tmp_path / "missing.onnx", plan, "pixel_values", CHW, settings(), max_batch_size=4)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("level", [-1, 6, 2.5, True, "3"])
def test_builder_optimization_level_refused(level):
    with pytest.raises(ConfigError, match=rf"builder_optimization_level={level!r}.*0 to 5"):
        settings(builder_optimization_level=level)


def test_settings_validation():
    with pytest.raises(ConfigError, match="hardware_compatibility='turing'"):
        settings(hardware_compatibility="turing")
    with pytest.raises(ConfigError, match="workspace_mb=0"):
        settings(workspace_mb=0)
    with pytest.raises(ConfigError, match="version_compatible"):
        settings(version_compatible="yes")
    with pytest.raises(ConfigError, match="batch profile"):
        EngineSettings(profile="8,4,2")
    s = EngineSettings(profile="1,2,4", timing_cache="cache/timing.cache", builder_optimization_level=0)
    assert s.profile == BatchProfile(1, 2, 4)
    assert s.timing_cache == Path("cache/timing.cache")


# -- trtexec command and build.sh -----------------------------------------------------------------


def test_trtexec_command_defaults():
    cmd = trtexec_command("m.onnx", "1/model.plan", "pixel_values", CHW, settings())
    assert cmd == [
        "trtexec",
        "--onnx=m.onnx",
        "--minShapes=pixel_values:1x3x224x224",
        "--optShapes=pixel_values:8x3x224x224",
        "--maxShapes=pixel_values:16x3x224x224",
        "--stronglyTyped",
        "--saveEngine=1/model.plan",
        "--builderOptimizationLevel=3",
        "--skipInference",
    ]
    assert not any(a.startswith(("--fp16", "--int8", "--best")) for a in cmd)


def test_trtexec_command_optional_flags():
    cmd = trtexec_command(
        "m.onnx",
        "model.plan",
        "pixel_values",
        (3, 336, 336),
        settings(
            builder_optimization_level=5,
            timing_cache=Path("timing.cache"),
            hardware_compatibility="ampere+",
            version_compatible=True,
            workspace_mb=2048,
        ),
    )
    for flag in (
        "--optShapes=pixel_values:8x3x336x336",
        "--timingCacheFile=timing.cache",
        "--builderOptimizationLevel=5",
        "--hardwareCompatibilityLevel=ampere+",
        "--versionCompatible",
        "--memPoolSize=workspace:2048M",
    ):
        assert flag in cmd
    same_cc = trtexec_command(
        "m.onnx", "p", "x", CHW, settings(hardware_compatibility="same-compute-capability")
    )
    assert "--hardwareCompatibilityLevel=sameComputeCapability" in same_cc


@pytest.mark.parametrize(("name", "chw"), [("a:b", CHW), ("", CHW), ("x", (3, 224)), ("x", (3, 0, 224))])
def test_trtexec_command_refuses_bad_io(name, chw):
    with pytest.raises(ConfigError):
        trtexec_command("m.onnx", "p", name, chw, settings())


def test_build_script(tmp_path):
    repo = tmp_path / "model_repository" / "vit b16" / "1"
    onnx = tmp_path / "onnx" / "vit.onnx"
    s = settings(timing_cache=tmp_path / "cache" / "timing.cache", hardware_compatibility="ampere+")
    script = write_build_script(repo, onnx, repo / "model.plan", "pixel_values", CHW, s)

    assert script == repo / "build.sh"
    assert os.access(script, os.X_OK)
    assert [p.name for p in repo.iterdir()] == ["build.sh"]  # no temp file left
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "NGC Triton container" in text
    subprocess.run(["bash", "-n", str(script)], check=True)

    # The command, with paths relative to the script's folder, is in the script verbatim.
    expected = trtexec_command(
        "../../../onnx/vit.onnx",
        "model.plan",
        "pixel_values",
        CHW,
        settings(timing_cache=Path("../../../cache/timing.cache"), hardware_compatibility="ampere+"),
    )
    body = text.split('"$TRTEXEC" \\\n', 1)[1].replace("\\\n", " ")
    assert shlex.split(body) == expected[1:]


def test_build_script_runs_trtexec_from_its_folder(tmp_path):
    """bash runs the script: it cd's to its folder and hands trtexec the exact argv."""
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\npwd > "$ARGS_OUT"; printf "%s\\n" "$@" >> "$ARGS_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "args.txt"
    repo = tmp_path / "repo" / "m" / "1"
    script = write_build_script(
        repo, tmp_path / "m.onnx", repo / "model.plan", "pixel_values", CHW, settings()
    )
    env = {**os.environ, "TRTEXEC": str(fake), "ARGS_OUT": str(out)}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    cwd, *argv = out.read_text().splitlines()
    assert cwd == str(repo)
    assert argv == trtexec_command("../../../m.onnx", "model.plan", "pixel_values", CHW, settings())[1:]


def test_build_script_without_trtexec_fails_clearly(tmp_path):
    script = write_build_script(tmp_path, tmp_path / "m.onnx", tmp_path / "model.plan", "x", CHW, settings())
    env = {**os.environ, "TRTEXEC": str(tmp_path / "no-trtexec")}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 127
    assert "trtexec not found" in res.stderr


# -- build_engine without TensorRT ----------------------------------------------------------------


@pytest.mark.skipif(engine.tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_build_engine_without_tensorrt(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not parsed: TensorRT is checked first")
    version_dir = tmp_path / "model_repository" / "vit" / "1"
    plan = version_dir / "model.plan"

    with pytest.raises(ExportError) as e:
        build_engine(onnx, plan, "pixel_values", CHW, settings())
    msg = str(e.value)
    assert msg.startswith("TensorRT not available: ")
    assert engine.tensorrt_unavailable_reason() in msg
    assert "build.sh" in msg and "NGC Triton container" in msg
    assert sorted(p.name for p in version_dir.iterdir()) == ["build.sh"]  # no plan, no temp file


def test_build_engine_missing_onnx(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "1" / "model.plan", "pixel_values", CHW, settings())


def test_engine_metadata_fields():
    meta = engine.engine_metadata(settings(hardware_compatibility="ampere+"))
    assert meta["profile"] == {"min": 1, "opt": 8, "max": 16}
    assert meta["builder_optimization_level"] == 3
    assert meta["hardware_compatibility"] == "ampere+"
    assert meta["version_compatible"] is False
    for key in ("tensorrt_version", "gpu_name", "compute_capability"):
        assert key in meta
    if engine.tensorrt_unavailable_reason() is not None and meta["gpu_name"] is None:
        assert meta["compute_capability"] is None


# -- a real build (GPU hosts; skipped elsewhere by conftest) --------------------------------------

TINY_CHW = (3, 32, 32)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A conv + pool + linear model, input pixel_values [N, 3, 32, 32] with a dynamic batch axis."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, *TINY_CHW),),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def _onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"pixel_values": x})[0]


def test_tiny_onnx_has_dynamic_batch(tiny_onnx):
    """The GPU tests' model: checked here so a broken fixture shows up on CPU hosts too."""
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *TINY_CHW), dtype=np.float32)
        assert _onnxruntime(tiny_onnx, x).shape == (batch, 5)


@pytest.mark.gpu
def test_build_and_run_matches_onnxruntime(tiny_onnx, tmp_path):
    plan = tmp_path / "model_repository" / "tiny" / "1" / "model.plan"
    cache = tmp_path / "timing.cache"
    s = EngineSettings(profile=BatchProfile(1, 2, 4), builder_optimization_level=0, timing_cache=cache)
    meta = build_engine(tiny_onnx, plan, "pixel_values", TINY_CHW, s, max_batch_size=4)

    assert plan.is_file() and cache.is_file()
    assert sorted(p.name for p in plan.parent.iterdir()) == ["build.sh", "model.plan"]
    assert meta["plan_sha256"] == __import__("hashlib").sha256(plan.read_bytes()).hexdigest()
    assert meta["tensorrt_version"] and meta["gpu_name"]
    assert meta["compute_capability"].count(".") == 1
    assert meta["profile"] == {"min": 1, "opt": 2, "max": 4}

    x = np.random.default_rng(0).standard_normal((3, *TINY_CHW), dtype=np.float32)
    got = run_engine(plan, x)["logits"]
    want = _onnxruntime(tiny_onnx, x)
    # TensorRT may use TF32 for FP32 convolutions and matmuls.
    np.testing.assert_allclose(got, want, rtol=5e-3, atol=5e-3)

    # The saved timing cache is loaded by the next build.
    meta2 = build_engine(tiny_onnx, plan, "pixel_values", TINY_CHW, s)
    assert meta2["plan_bytes"] > 0


@pytest.mark.gpu
def test_run_engine_refuses_batch_outside_profile(tiny_onnx, tmp_path):
    plan = tmp_path / "model.plan"
    build_engine(tiny_onnx, plan, "pixel_values", TINY_CHW, EngineSettings(profile=BatchProfile(1, 1, 2)))
    with pytest.raises(ExportError, match=r"outside the profile"):
        run_engine(plan, np.zeros((3, *TINY_CHW), dtype=np.float32))


@pytest.mark.gpu
def test_build_engine_reports_unknown_input(tiny_onnx, tmp_path):
    with pytest.raises(ExportError, match=r"no input 'images'.*pixel_values"):
        build_engine(tiny_onnx, tmp_path / "model.plan", "images", TINY_CHW, settings())


# -- the pinned release, provenance and the plan cache --------------------------------------------


def test_build_script_names_the_pinned_image(tmp_path):
    from vitserve.exporter.gpu_release import TENSORRT_VERSION, TRITON_IMAGE

    text = write_build_script(
        tmp_path, tmp_path / "m.onnx", tmp_path / "model.plan", "x", CHW, settings()
    ).read_text()
    assert TRITON_IMAGE in text and TENSORRT_VERSION in text and "make engines-gpu" in text


def test_host_tensorrt_version_is_none_or_a_version():
    version = engine.tensorrt_version()
    assert version is None or __import__("re").match(r"^\d+\.\d+\.\d+", version)
    host = engine.host_provenance()
    assert set(host) == {"tensorrt_version", "gpu_name", "compute_capability"}


@pytest.mark.gpu
def test_one_logger_per_process():
    import tensorrt as trt

    assert engine._logger(trt) is engine._logger(trt)


@pytest.mark.gpu
def test_cached_rebuild_copies_the_plan_and_matches_this_host(tiny_onnx, tmp_path):
    cache = tmp_path / "artifacts" / "engines"
    s = EngineSettings(profile=BatchProfile(1, 2, 4), builder_optimization_level=0)
    plan = tmp_path / "repo" / "tiny" / "1" / "model.plan"
    first = engine.build_engine_cached(tiny_onnx, plan, "pixel_values", TINY_CHW, s, cache, max_batch_size=4)
    assert first["cached"] is False and (cache / first["cache_key"] / "model.plan").is_file()
    assert list((cache / "timing").iterdir())  # the timing cache is kept under artifacts/
    plan.unlink()
    second = engine.build_engine_cached(tiny_onnx, plan, "pixel_values", TINY_CHW, s, cache, max_batch_size=4)
    assert second["cached"] is True and second["plan_sha256"] == first["plan_sha256"]
    assert engine.sha256_file(plan) == first["plan_sha256"]
    assert engine.provenance_problems("tiny", second, engine.host_provenance()) == []
