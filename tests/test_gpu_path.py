"""The GPU path on a CPU host, up to the first call that needs a GPU: the one pinned release (image, pip
extra, README), plan provenance checks, the plan cache key, verified-only publication and ensemble routing,
the GPU serving settings in config.pbtxt, the INT8-for-TensorRT graph, and `make gpu-check --dry-run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vitserve.errors import ConfigError, ExportError
from vitserve.exporter import engine, gpu_release
from vitserve.exporter.config import BatchProfile, DynamicBatching, Gates, Kind, ModelSpec, Precision
from vitserve.exporter.engine import EngineSettings, provenance_problems
from vitserve.perf import gpu_check

ROOT = Path(__file__).resolve().parents[1]
CHW = (3, 224, 224)
BUILT = {
    "tensorrt_version": "10.13.3.9",
    "compute_capability": "9.0",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "hardware_compatibility": None,
    "version_compatible": False,
}
HOST = {"tensorrt_version": "10.13.3", "compute_capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3"}


# -- one place names the release ------------------------------------------------------------------


def _instructions(dockerfile: str) -> list[str]:
    """A Dockerfile's instructions, comments dropped and continuation lines joined."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_dockerfile_base_comes_from_gpu_release_and_tensorrt_from_the_image():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    # The base is an ARG without a default: only `make image` (gpu_check) fills it.
    assert re.search(r"^ARG TRITON_IMAGE$", dockerfile, flags=re.M)
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", dockerfile, flags=re.M)
    assert "nvcr.io" not in dockerfile and "tensorrt-cu" not in dockerfile
    # No TensorRT version goes in: the build reads the image's own libnvinfer, installs the Python package
    # gpu_release prints for it, and records both (self-check adds the Python side).
    assert "TENSORRT_PIP" not in dockerfile and "TENSORRT_VERSION" not in dockerfile
    runs = [i.removeprefix("RUN ") for i in _instructions(dockerfile) if i.startswith("RUN ")]
    (install,) = [r for r in runs if "image-tensorrt" in r]
    assert f"exporter/gpu_release.py image-tensorrt {gpu_release.IMAGE_TENSORRT_RECORD}" in install
    assert 'tensorrt_pip="$(' in install and '"${tensorrt_pip}"' in install and "pip install" in install
    assert runs.index(install) < runs.index("python3 -m vitserve.perf.gpu_check self-check")
    cmd = gpu_check.image_build_command()
    assert [a for a in cmd if a.startswith(("TRITON_IMAGE=", "TENSORRT"))] == [
        f"TRITON_IMAGE={gpu_release.TRITON_IMAGE}"
    ]
    assert cmd[cmd.index("-f") + 1] == "docker/Dockerfile"
    # The host-side pip extra pins the documented (unverified) TensorRT of that release.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [gpu_release.TENSORRT_PIP]
    assert gpu_release.TENSORRT_PIP == "tensorrt-cu13==10.13.3.*"
    assert gpu_release.TRITON_IMAGE.startswith("nvcr.io/nvidia/tritonserver:" + gpu_release.TRITON_RELEASE)
    # The README's GPU section names the same release.
    assert gpu_release.TRITON_IMAGE in (ROOT / "README.md").read_text()


def test_image_keeps_nvidias_entrypoint_then_checks_engines():
    """NGC's entrypoint (driver check, CUDA compat set-up) runs first and execs vitserve's, which execs
    the command: nothing of the image's own entrypoint is lost."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    (entry,) = [
        i.removeprefix("ENTRYPOINT ") for i in _instructions(dockerfile) if i.startswith("ENTRYPOINT")
    ]
    assert json.loads(entry) == ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/vitserve/entrypoint.sh"]
    assert "COPY docker/entrypoint.sh /opt/vitserve/entrypoint.sh" in dockerfile


# -- the image's own TensorRT, read while it is built ---------------------------------------------

# `dpkg-query -W -f='${Package}\t${Version}\t${db:Status-Abbrev}\n' 'libnvinfer*'` as dpkg prints it
# (tab-separated; "ii " installed, "un " known but not installed, empty version), with the version form
# of NVIDIA's TensorRT packages (UPSTREAM-REVISION+cudaMAJOR.MINOR).
DPKG_CU13 = (
    "libnvinfer-bin\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer-dev\t\tun \n"
    "libnvinfer-dispatch10\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer-lean10\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer-plugin10\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer-vc-plugin10\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer10\t10.13.3.9-1+cuda13.0\tii \n"
    "libnvinfer9\t\tun \n"
)
# A TensorRT 10 library directory (the tarball's lib/ and the packages' files alike).
LIB_FILES = [
    "libcudart.so.13", "libcudart.so.13.0.96", "libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.10.13.3",
    "libnvinfer_builder_resource.so.10.13.3", "libnvinfer_dispatch.so.10", "libnvinfer_dispatch.so.10.13.3",
    "libnvinfer_lean.so.10", "libnvinfer_lean.so.10.13.3", "libnvinfer_plugin.so.10",
    "libnvinfer_plugin.so.10.13.3", "libnvonnxparser.so.10", "libnvonnxparser.so.10.13.3",
]  # fmt: skip


def test_image_tensorrt_from_dpkg_and_library_files():
    from packaging.requirements import Requirement

    assert gpu_release.parse_dpkg_libnvinfer(DPKG_CU13) == ("10.13.3.9", 13)
    record = gpu_release.image_tensorrt(DPKG_CU13, LIB_FILES, None)
    assert record["tensorrt"] == "10.13.3.9" and record["cuda_major"] == 13
    assert record["requirement"] == "tensorrt-cu13==10.13.3.9.*"
    # PyPI's package for that build is 10.13.3.9.post1 (ENVIRONMENT.md); another TensorRT is not accepted.
    spec = Requirement(record["requirement"]).specifier
    assert "10.13.3.9.post1" in spec and "10.13.3.9" in spec and "10.14.1.48" not in spec
    # A CUDA 12 image gets the cu12 package; an epoch in the Debian version is allowed.
    cu12 = "libnvinfer10\t1:10.7.0.23-1+cuda12.6\tii \n"
    assert gpu_release.image_tensorrt(cu12, [], None)["requirement"] == "tensorrt-cu12==10.7.0.23.*"
    # No dpkg record (a tarball install): the library file's three numbers and the image's CUDA_VERSION.
    assert gpu_release.parse_libnvinfer_files(LIB_FILES) == "10.13.3"
    assert (
        gpu_release.image_tensorrt("", LIB_FILES, "13.0.2.006")["requirement"] == "tensorrt-cu13==10.13.3.*"
    )
    assert gpu_release.image_tensorrt(None, LIB_FILES, None)["cuda_major"] == 13  # from libcudart.so.13
    # Two sources that disagree, or nothing to read, stop the build with what was seen.
    with pytest.raises(gpu_release.ImageTensorRTError, match=r"10\.13\.3\.9.*libnvinfer\.so\.10\.14\.1"):
        gpu_release.image_tensorrt(DPKG_CU13, ["libnvinfer.so.10.14.1"], None)
    with pytest.raises(gpu_release.ImageTensorRTError, match=r"no libnvinfer in this image.*dpkg-query"):
        gpu_release.image_tensorrt("libnvinfer10\t\tun \n", ["libnvinfer.so.10"], None)


def test_image_tensorrt_command_writes_the_record(tmp_path):
    """`gpu_release.py image-tensorrt RECORD` with a bare python3, as the Dockerfile runs it: the real
    dpkg-query of this (TensorRT-less) machine finds nothing, so the build would stop; with a libnvinfer
    file on LD_LIBRARY_PATH it records that version and prints the requirement to install."""
    script = [sys.executable, "-S", str(ROOT / "exporter" / "gpu_release.py"), "image-tensorrt"]
    record = tmp_path / "opt" / "tensorrt.json"
    env = {"PATH": os.environ["PATH"]}
    none = subprocess.run([*script, str(record)], capture_output=True, text=True, env=env)
    assert none.returncode == 1 and "no libnvinfer in this image" in none.stderr and not record.exists()
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("libnvinfer.so.10.13.3", "libnvinfer_plugin.so.10.13.3"):
        (lib / name).write_bytes(b"")
    env |= {"LD_LIBRARY_PATH": str(lib), "CUDA_VERSION": "13.0.2.006"}
    out = subprocess.run([*script, str(record)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "tensorrt-cu13==10.13.3.*"
    assert json.loads(record.read_text()) == {
        "tensorrt": "10.13.3", "cuda_major": 13, "requirement": "tensorrt-cu13==10.13.3.*",
        "source": "libnvinfer.so.10.13.3",
    }  # fmt: skip


def test_self_check_reads_the_image_record(tmp_path, capsys):
    """`gpu_check self-check` (the image build's last TensorRT step) compares against the recorded
    TensorRT; on this host neither libnvinfer nor the Python package is there, so it stops naming it."""
    assert gpu_check.self_check(str(tmp_path / "missing.json")) == 1
    assert "unreadable" in capsys.readouterr().err
    record = tmp_path / "tensorrt.json"
    record.write_text(json.dumps({"tensorrt": "10.13.3.9", "source": "dpkg libnvinfer 10.13.3.9+cuda13"}))
    assert gpu_check.self_check(str(record)) == 1
    err = capsys.readouterr().err
    assert (
        "libnvinfer (Triton's TensorRT backend): not found in the image (its libnvinfer is TensorRT 10.13.3.9)"
        in err
    )
    assert json.loads(record.read_text()) == {
        "tensorrt": "10.13.3.9",
        "source": "dpkg libnvinfer 10.13.3.9+cuda13",
    }


def test_make_image_dry_run_shows_how_the_image_picks_its_tensorrt(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vitserve.perf.gpu_check", "--dry-run", "image"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    build, record = [ln for ln in out.stdout.splitlines() if ln.startswith("[dry-run] docker")]
    assert "--build-arg TENSORRT" not in build and f"TRITON_IMAGE={gpu_release.TRITON_IMAGE}" in build
    assert "gpu_release.py image-tensorrt" in out.stdout and "dpkg-query" in out.stdout
    assert record.endswith(f"cat {gpu_check.IMAGE_TAG} {gpu_release.IMAGE_TENSORRT_RECORD}")


def test_gpu_release_runs_without_vitserve_installed():
    """make reads the release with a bare python3 (a GPU host's, before any venv)."""
    for field, want in (("image", gpu_release.TRITON_IMAGE), ("tensorrt-pip", gpu_release.TENSORRT_PIP)):
        out = subprocess.run(
            [sys.executable, "-S", str(ROOT / "exporter" / "gpu_release.py"), field],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.environ["PATH"]},
        )
        assert out.stdout.strip() == want
    bad = subprocess.run(
        [sys.executable, str(ROOT / "exporter" / "gpu_release.py"), "nope"], capture_output=True
    )
    assert bad.returncode == 2


def test_version_tuple():
    assert gpu_release.version_tuple("10.13.3.9") == (10, 13, 3)
    assert gpu_release.version_tuple("10.13.3.9.post1") == gpu_release.version_tuple("10.13.3")
    with pytest.raises(ValueError, match=r"'10\.x'"):
        gpu_release.version_tuple("10.x")


def test_image_self_check_compares_both_tensorrts_with_the_recorded_one():
    recorded = "10.13.3.9"  # what the image build read from its own libnvinfer
    assert gpu_check.image_tensorrt_problems("10.13.3", "10.13.3.9", recorded) == []
    problems = gpu_check.image_tensorrt_problems("10.14.1", None, recorded)
    assert len(problems) == 2
    assert "libnvinfer" in problems[0] and "10.14.1" in problems[0] and recorded in problems[0]
    assert "tensorrt Python: not found" in problems[1]


# -- provenance: plans refused before serving -----------------------------------------------------


def test_provenance_matching_plan_passes():
    assert provenance_problems("m_fp16_tensorrt", BUILT, HOST) == []


def test_provenance_tensorrt_mismatch_names_both_versions_and_the_fix():
    (msg,) = provenance_problems("m_fp16_tensorrt", BUILT, {**HOST, "tensorrt_version": "10.14.1"})
    assert "built with TensorRT 10.13.3.9" in msg and "this host has TensorRT 10.14.1" in msg
    assert (
        "make engines-gpu" in msg and gpu_release.TRITON_IMAGE in msg and "m_fp16_tensorrt/1/build.sh" in msg
    )


def test_provenance_gpu_mismatch_names_both_capabilities():
    host = {**HOST, "compute_capability": "8.9", "gpu_name": "NVIDIA L4"}
    (msg,) = provenance_problems("m", BUILT, host)
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3)" in msg and "has 8.9 (NVIDIA L4)" in msg


def test_provenance_portability_options():
    ampere = {**BUILT, "compute_capability": "8.0", "hardware_compatibility": "ampere+"}
    assert provenance_problems("m", ampere, {**HOST, "compute_capability": "8.9"}) == []
    assert provenance_problems("m", ampere, {**HOST, "compute_capability": "7.5"})
    vc = {**BUILT, "version_compatible": True}
    assert provenance_problems("m", vc, {**HOST, "tensorrt_version": "10.14.1"}) == []
    assert provenance_problems("m", vc, {**HOST, "tensorrt_version": "10.12.0"})  # older runtime
    assert provenance_problems("m", vc, {**HOST, "tensorrt_version": "11.0.0"})  # another major


def test_provenance_missing_information():
    assert "records no TensorRT version" in provenance_problems("m", {}, HOST)[0]
    problems = provenance_problems("m", BUILT, {"tensorrt_version": None, "compute_capability": None})
    assert any("no TensorRT found" in p for p in problems) and any("no GPU visible" in p for p in problems)


def _repo_with_plan(tmp_path: Path, record: dict) -> Path:
    repo = tmp_path / "repo"
    plan = repo / "m_fp16_tensorrt" / "1" / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"serialized engine bytes")
    record = {"plan_sha256": engine.sha256_file(plan), **record}
    manifest = {"models": {"m": {"engines": {"m_fp16_tensorrt": record}}}}
    (repo / "vitserve-manifest.json").write_text(json.dumps(manifest))
    return repo


def test_check_repository(tmp_path):
    repo = _repo_with_plan(tmp_path, BUILT)
    assert engine.check_repository(repo, HOST) == []
    (msg,) = engine.check_repository(repo, {**HOST, "tensorrt_version": "10.14.1"})
    assert "10.13.3.9" in msg and "10.14.1" in msg
    (repo / "m_fp16_tensorrt" / "1" / "model.plan").write_bytes(b"another plan")
    assert "sha256 differs" in engine.check_repository(repo, HOST)[0]
    (repo / "vitserve-manifest.json").unlink()
    assert "no vitserve-manifest.json" in engine.check_repository(repo, HOST)[0]


def _env_with_fake_tritonserver(tmp_path: Path) -> dict[str, str]:
    """PATH with a `tritonserver` that only says it started (and this venv's python, for `vitserve`)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "tritonserver").write_text('#!/usr/bin/env bash\necho "server started $*"\n')
    (fake_bin / "tritonserver").chmod(0o755)
    return {**os.environ, "PATH": f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_entrypoint_checks_plans_before_tritonserver(tmp_path):
    """docker/entrypoint.sh runs the real `vitserve check-engines` on the repository of the tritonserver
    command; this host has no TensorRT, so a recorded plan is refused before the server is started."""
    env = _env_with_fake_tritonserver(tmp_path)
    entry = str(ROOT / "docker" / "entrypoint.sh")
    repo = _repo_with_plan(tmp_path, BUILT)

    refused = subprocess.run(
        ["bash", entry, "tritonserver", f"--model-repository={repo}"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 3, refused.stderr
    assert "server started" not in refused.stdout
    assert "m_fp16_tensorrt" in refused.stderr and "10.13.3.9" in refused.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    ok = subprocess.run(
        ["bash", entry, "tritonserver", "--model-repository", str(empty)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"server started --model-repository {empty}" in ok.stdout


def test_entrypoint_takes_plain_tritonserver_args(tmp_path):
    """Kubernetes `args:` without a command reach the image's ENTRYPOINT as plain tritonserver flags: the
    entrypoint checks the plans and runs tritonserver with them."""
    env = _env_with_fake_tritonserver(tmp_path)
    entry = str(ROOT / "docker" / "entrypoint.sh")
    repo = _repo_with_plan(tmp_path, BUILT)
    refused = subprocess.run(
        ["bash", entry, f"--model-repository={repo}", "--strict-readiness=true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 3, refused.stderr
    assert "m_fp16_tensorrt" in refused.stderr and "server started" not in refused.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    ok = subprocess.run(
        ["bash", entry, f"--model-repository={empty}", "--strict-readiness=true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"server started --model-repository={empty} --strict-readiness=true" in ok.stdout


# -- plan and timing cache ------------------------------------------------------------------------


def test_plan_cache_key_changes_with_every_input():
    s = EngineSettings(profile=BatchProfile(1, 8, 16))
    base = ("a" * 64, "10.13.3.9", "9.0", s, "pixel_values", CHW)
    key = engine.plan_cache_key(*base)
    assert key == engine.plan_cache_key(*base)
    variants = [
        ("b" * 64, *base[1:]),
        (base[0], "10.14.1.48", *base[2:]),
        (*base[:2], "8.9", *base[3:]),
        (*base[:3], EngineSettings(profile=BatchProfile(1, 4, 16)), *base[4:]),
        (*base[:3], EngineSettings(profile=BatchProfile(1, 8, 16), builder_optimization_level=5), *base[4:]),
        (
            *base[:3],
            EngineSettings(profile=BatchProfile(1, 8, 16), hardware_compatibility="ampere+"),
            *base[4:],
        ),
        (*base[:5], (3, 224, 336)),
    ]
    keys = {engine.plan_cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # Where the timing cache lives does not change the plan.
    moved = EngineSettings(profile=BatchProfile(1, 8, 16), timing_cache=Path("elsewhere.cache"))
    assert engine.plan_cache_key(*base[:3], moved, *base[4:]) == key
    t1 = engine.timing_cache_path("artifacts/engines", "10.13.3.9", "9.0")
    assert t1 != engine.timing_cache_path("artifacts/engines", "10.13.3.9", "8.9")
    assert t1.parent == Path("artifacts/engines/timing")


def test_onnx_digest_covers_external_data(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph")
    d1 = engine.onnx_digest(onnx)
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    d2 = engine.onnx_digest(onnx)
    (tmp_path / "model.onnx.data").write_bytes(b"other weights")
    assert len({d1, d2, engine.onnx_digest(onnx)}) == 3


def test_plan_cache_roundtrip(tmp_path):
    cache = tmp_path / "engines"
    cache.mkdir()
    built = tmp_path / "build" / "model.plan"
    built.parent.mkdir()
    built.write_bytes(b"plan v1")
    meta = {"plan_sha256": engine.sha256_file(built), "tensorrt_version": "10.13.3.9"}
    assert engine.cached_plan(cache, "k1", tmp_path / "out.plan") is None
    engine.store_plan(cache, "k1", built, meta)
    target = tmp_path / "repo" / "m" / "1" / "model.plan"
    hit = engine.cached_plan(cache, "k1", target)
    assert hit["cached"] is True and hit["cache_key"] == "k1" and hit["tensorrt_version"] == "10.13.3.9"
    assert target.read_bytes() == b"plan v1"
    assert not [p for p in target.parent.iterdir() if p.name != "model.plan"]  # no temp file left
    (cache / "k1" / "model.plan").write_bytes(b"damaged")
    assert engine.cached_plan(cache, "k1", target) is None


def test_no_silent_weakly_typed_fallback():
    """Against TensorRT's documented API: a TensorRT without STRONGLY_TYPED is refused, never weakly typed."""
    old = SimpleNamespace(
        __version__="8.6.1", NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0)
    )
    with pytest.raises(ExportError, match=r"TensorRT 8\.6\.1 cannot build strongly typed.*make engines-gpu"):
        engine.strongly_typed_flags(old)
    new = SimpleNamespace(
        __version__="10.13.3.9", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5)
    )
    assert engine.strongly_typed_flags(new) == 1 << 5


# -- only verified plans are published ------------------------------------------------------------


def _spec(**kw) -> ModelSpec:
    base = {
        "name": "m",
        "backbone": "ViT-B-32",
        "precisions": (Precision.FP32, Precision.FP16, Precision.INT8),
        "kinds": (Kind.TENSORRT,),
        "profile": BatchProfile(1, 4, 8),
        "dynamic_batching": DynamicBatching((2, 4, 16)),
        "preprocess": "pillow",  # the python model: these tests are about the backbone models
    }
    return ModelSpec(**(base | kw))


MANIFEST = {
    "input": {"shape": [-1, 3, 224, 320]},
    "outputs": ["embeddings"],
    "feature_dim": 8,
    "head": {"num_classes": 0},
    "preprocess": {
        "size": 224,
        "resize_size": 224,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
}


def _write_repo(tmp_path: Path, spec: ModelSpec):
    from vitserve.exporter.repository import Variant, write_model

    tmp_path.mkdir(parents=True, exist_ok=True)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    variants = [Variant(p, k, onnx) for k in spec.kinds for p in spec.precisions]
    repo = tmp_path / "repo"
    write_model(repo, spec, MANIFEST, variants, None)
    return repo, variants


def _verified(precision: Precision, spec: ModelSpec, noise: float) -> dict:
    """A plan's verification record, scored by the real comparison and gate on outputs that differ from
    the reference by `noise`."""
    from vitserve.exporter.compare import compare_outputs
    from vitserve.exporter.pipeline import _engine_gate

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 8)).astype(np.float32)
    got = ref + noise * rng.standard_normal(ref.shape).astype(np.float32)
    report = {"outputs": compare_outputs({"embeddings": ref}, {"embeddings": got})}
    report["passed"], report["gate"] = _engine_gate(precision, report, spec)
    return {"built": True, "cached": False, "fidelity": report}


def _routed(repo: Path) -> str:
    from vitserve.exporter.repository import read_config

    return read_config(repo / "m" / "config.pbtxt").ensemble_scheduling.step[1].model_name


@pytest.mark.parametrize("force", [False, True])
def test_plan_failing_its_gate_is_withheld_and_never_routed_to(tmp_path, force):
    from vitserve.exporter.pipeline import engine_table, publish_engines

    spec = _spec(force=force, gates=Gates(fp16_mean_cosine=0.999))
    repo, variants = _write_repo(tmp_path, spec)
    assert _routed(repo) == "m_fp16_tensorrt"
    engines = {
        "m_fp32_tensorrt": _verified(Precision.FP32, spec, 1e-4),
        "m_fp16_tensorrt": _verified(Precision.FP16, spec, 0.5),  # forced failure: cosine ~0.9
        "m_int8_tensorrt": _verified(Precision.INT8, spec, 1e-2),
    }
    assert not engines["m_fp16_tensorrt"]["fidelity"]["passed"]
    assert engines["m_fp32_tensorrt"]["fidelity"]["passed"]
    kept, serve = publish_engines(repo, spec, variants, engines)
    table = engine_table(engines)
    if force:
        assert serve == _routed(repo) == "m_fp16_tensorrt"
        assert (repo / "m_fp16_tensorrt").is_dir() and engines["m_fp16_tensorrt"]["published"]
        assert "WITHHELD" not in table
    else:
        assert serve == _routed(repo) == "m_fp32_tensorrt"
        assert not (repo / "m_fp16_tensorrt").exists()
        assert engines["m_fp16_tensorrt"]["published"] is False
        assert engines["m_fp16_tensorrt"]["withheld"].startswith("FAIL: embeddings mean cosine")
        assert [v.precision for v in kept] == [Precision.FP32, Precision.INT8]
        row = next(line for line in table.splitlines() if "m_fp16_tensorrt" in line)
        assert "WITHHELD" in row and "FAIL" in row


def test_every_plan_failing_is_an_error_and_unbuilt_plans_are_pending(tmp_path):
    from vitserve.exporter.pipeline import engine_decisions, publish_engines

    spec = _spec(precisions=(Precision.FP32, Precision.FP16))
    repo, variants = _write_repo(tmp_path, spec)
    bad = {n: _verified(Precision.FP16, spec, 0.5) for n in ("m_fp32_tensorrt", "m_fp16_tensorrt")}
    with pytest.raises(ExportError, match="every plan it could serve failed verification"):
        publish_engines(repo, spec, variants, bad)
    pending = {"m_fp16_tensorrt": {"built": False, "build_script": "m_fp16_tensorrt/1/build.sh"}}
    assert engine_decisions(pending, force=False) == {"m_fp16_tensorrt": None}


# -- GPU serving settings -------------------------------------------------------------------------


def test_tensorrt_config_cuda_graphs_warmup_instances_non_square(tmp_path):
    from vitserve.exporter.repository import preprocess_instances, read_config

    spec = _spec(backbone_instances=3, instances=1)
    repo, _ = _write_repo(tmp_path, spec)
    cfg = read_config(repo / "m_fp16_tensorrt" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert list(cfg.input[0].dims) == [3, 224, 320]  # H and W taken separately
    assert cfg.optimization.cuda.graphs
    assert sorted(g.batch_size for g in cfg.optimization.cuda.graph_spec) == [2, 4]  # opt + preferred <= max
    assert list(cfg.optimization.cuda.graph_spec[0].input["pixel_values"].dim) == [3, 224, 320]
    (warm,) = cfg.model_warmup
    assert warm.batch_size == spec.profile.opt
    assert warm.inputs["pixel_values"].input_data_file == "pixel_values.bin"
    assert list(warm.inputs["pixel_values"].dims) == [3, 224, 320]
    assert cfg.instance_group[0].count == 3
    pre = read_config(repo / "m_preprocess" / "config.pbtxt").instance_group[0].count
    assert pre == preprocess_instances(spec)  # the preprocess model keeps its own count


def test_onnxruntime_tensorrt_accelerator_is_opt_in(tmp_path):
    from vitserve.exporter.repository import read_config

    for opt_in in (False, True):
        spec = _spec(kinds=(Kind.ONNXRUNTIME,), onnxruntime_trt_fp16=opt_in)
        repo, _ = _write_repo(tmp_path / str(opt_in), spec)
        cfg = read_config(repo / "m_fp32_onnxruntime" / "config.pbtxt")
        accs = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert not cfg.optimization.cuda.graphs
        if opt_in:
            (acc,) = accs
            assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
        else:
            assert len(accs) == 0


def test_new_config_fields_refused_with_their_value():
    with pytest.raises(ConfigError, match=r"backbone_instances=0"):
        _spec(backbone_instances=0)
    with pytest.raises(ConfigError, match=r"onnxruntime_trt_fp16='yes'"):
        ModelSpec.from_dict({"name": "m", "backbone": "ViT-B-32", "onnxruntime_trt_fp16": "yes"})


def test_onnxruntime_version_whichever_wheel():
    import onnxruntime

    from vitserve.exporter.precision import _onnxruntime_version

    assert _onnxruntime_version() == onnxruntime.__version__


# -- INT8 for TensorRT: Q/DQ on the weight matmuls, FP16 elsewhere ----------------------------------


@pytest.fixture(scope="module")
def tiny_vit_onnx(tmp_path_factory) -> Path:
    """One pre-norm attention block + head, with the attention matmuls of a ViT (Q.K^T, softmax.V)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(16)
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 8)

        def forward(self, x):
            t = x.reshape(x.shape[0], 12, 16)
            q, k, v = self.qkv(self.ln(t)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
            t = t + self.proj(att @ v)
            e = self.head(t.mean(1))
            return e / e.norm(dim=-1, keepdim=True)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tinyvit") / "model.onnx"
    torch.onnx.export(
        Block().eval(),
        (torch.zeros(1, 3, 8, 8),),
        str(path),
        input_names=["pixel_values"],
        output_names=["embeddings"],
        dynamic_axes={"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def test_int8_for_tensorrt_has_qdq_on_weight_matmuls_and_fp16_elsewhere(tiny_vit_onnx, tmp_path):
    import onnxruntime as ort

    from vitserve.exporter.precision import attention_matmuls, make_int8
    from vitserve.perf.bench_int8_qdq import placement

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    dst = tmp_path / "int8.onnx"
    details = make_int8(tiny_vit_onnx, dst, calib, "max")
    assert details["high_precision_dtype"] == "fp16" and details["excluded_attention_matmuls"] == 2

    placed = placement(dst)
    assert sorted(placed["matmul_with_int8_weight_names"]) == ["/proj/MatMul", "/qkv/MatMul"]
    # The attention matmuls get no Q/DQ (ModelOpt also leaves this small head Gemm unquantized).
    assert set(attention_matmuls(tiny_vit_onnx)) <= set(placed["matmul_without_qdq_names"])
    assert placed["initializer_dtypes"].get("FLOAT16", 0) > 0
    assert "LayerNormalization" in placed["fp32_op_types_present"]

    # Evaluated as fake quantization, FP16 parts at ORT_ENABLE_EXTENDED (how FP16 is evaluated).
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x}
    )[0]
    ref = ort.InferenceSession(str(tiny_vit_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x}
    )[0]
    assert got.dtype == np.float32  # I/O kept FP32
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98


def test_fp16_saved_with_external_data_past_threshold(tiny_vit_onnx, tmp_path):
    import onnx

    from vitserve.exporter.precision import save_onnx

    model = onnx.load(str(tiny_vit_onnx))
    assert not save_onnx(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    assert save_onnx(onnx.load(str(tiny_vit_onnx)), tmp_path / "big.onnx", threshold_bytes=1)
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert engine.onnx_digest(tmp_path / "big.onnx") != engine.onnx_digest(tmp_path / "small.onnx")
    onnx.checker.check_model(str(tmp_path / "big.onnx"))


# -- the validation kit, dry-run ------------------------------------------------------------------


def test_gpu_check_dry_run_prints_every_command_and_runs_none(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vitserve.perf.gpu_check", "--dry-run", "all", "--config",
         str(ROOT / "models.gpu.yaml"), "--repository", str(tmp_path / "repo"),
         "--artifacts", str(tmp_path / "artifacts"), "--batch", "1,8", "--concurrency", "1,4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    docker = [ln for ln in lines if ln.startswith("[dry-run] docker")]
    assert f"--build-arg TRITON_IMAGE={gpu_release.TRITON_IMAGE}" in docker[0]
    assert any("vitserve build-engines --repository /models" in ln and "--gpus all" in ln for ln in docker)
    assert any(" build --config " in ln for ln in lines)
    trtexec = [ln for ln in lines if "(equivalent trtexec" in ln]
    assert len(trtexec) == 3 and all("--stronglyTyped" in ln for ln in trtexec)
    perf = [ln for ln in docker if "perf_analyzer" in ln]
    assert len(perf) == 3 * 2 * 2  # plans x batches x concurrencies
    assert all(gpu_check.SDK_IMAGE in ln and "--collect-metrics" in ln for ln in perf)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "artifacts").exists()


def test_make_targets_pass_dry_run():
    out = subprocess.run(
        ["make", "-n", "image", "engines-gpu", "gpu-check", "DRY_RUN=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for step in ("image", "engines-gpu", "all"):
        assert f"vitserve.perf.gpu_check --dry-run {step}" in out.stdout


def test_report_from_perf_analyzer_csv(tmp_path):
    csv_path = tmp_path / "p.csv"
    header = (
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
        "Avg latency,request/response,response wait,Avg GPU Utilization,Avg GPU Power Usage,Max GPU Memory Usage,"
        "Total GPU Memory"
    )
    csv_path.write_text(
        header + "\n4,1234.5,10,200,30,40,3000,20,5,3100,3300,3400,3900,3150,0,0,GPU-abc:0.9;GPU-def:0.7;,"
        "GPU-abc:250;,GPU-abc:1000;,GPU-abc:80000;\n"
    )
    point = gpu_check.parse_point(csv_path)
    assert point == {"images_per_s": 1234.5, "p50_ms": 3.1, "p99_ms": 3.9, "gpu_util": pytest.approx(0.8)}
    data = {
        "command": "python -m vitserve.perf.gpu_check all",
        "versions": {"gpu": "NVIDIA H100", "tensorrt": gpu_release.TENSORRT_VERSION},
        "plans": [{"plan": "m_fp16_tensorrt", "published": True, "emb_cos_mean": 0.9999}],
        "points": [{"model": "m_fp16_tensorrt", "precision": "fp16", "batch": 8, "concurrency": 4} | point],
        "commands": ["docker build ..."],
    }
    report = gpu_check.write_report(tmp_path / f"gpu-{gpu_check.slug('NVIDIA H100 80GB HBM3')}", data)
    assert report.parent.name == "gpu-nvidia-h100-80gb-hbm3"
    text = report.read_text()
    assert "1234" in text and gpu_release.TENSORRT_VERSION in text and "docker build" in text


@pytest.mark.skipif(engine.tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_build_engines_without_tensorrt_says_where_to_run(tmp_path):
    from vitserve.exporter.pipeline import build_engines

    with pytest.raises(ExportError, match=r"TensorRT not available: .*make engines-gpu"):
        build_engines(tmp_path, tmp_path / "cache")


@pytest.mark.slow
def test_make_engines_with_tensorrt_kind_writes_fp16_int8_onnx_and_build_scripts(tmp_path):
    """`make engines` with kinds: [tensorrt] on a CPU host: FP16 and INT8 ONNX, a build.sh per plan, the
    verify set and warmup photo, and an engine table that leaves publication to make engines-gpu."""
    import onnx
    import yaml

    from vitserve.exporter.config import ModelSpec as Spec
    from vitserve.exporter.pipeline import build_all
    from vitserve.exporter.repository import read_config

    config = tmp_path / "models.yaml"
    model = {
        "name": "vitb32",
        "backbone": "ViT-B-32",
        "weights": "random",
        "head": "none",
        "precisions": ["fp32", "fp16", "int8"],
        "kinds": ["tensorrt"],
        "profile": {"min": 1, "opt": 4, "max": 8},
        "calibration": {"num_images": 8},
        "gates": {"int8_mean_cosine": 0.9},
    }
    config.write_text(yaml.safe_dump({"models": [model]}))
    repo, artifacts = tmp_path / "repo", tmp_path / "artifacts"
    summary = build_all(config, repo, artifacts, random_init=True)
    for p in ("fp32", "fp16", "int8"):
        mdir = repo / f"vitb32_{p}_tensorrt"
        assert os.access(mdir / "1" / "build.sh", os.X_OK)
        assert (mdir / "onnx" / "model.onnx").is_file() and (mdir / "verify.npz").is_file()
        assert (mdir / "warmup" / "pixel_values.bin").stat().st_size == 3 * 224 * 224 * 4
        assert read_config(mdir / "config.pbtxt").optimization.cuda.graphs
    int8 = onnx.load(str(repo / "vitb32_int8_tensorrt" / "onnx" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in int8.graph.initializer)
    engines = summary["models"]["vitb32"]["engines"]
    assert all(not e["built"] for e in engines.values())
    # `vitserve build-engines` rebuilds the spec from the manifest alone.
    rec = json.loads((repo / "vitserve-manifest.json").read_text())["models"]["vitb32"]
    spec = Spec.from_dict({**rec["config"], "name": "vitb32"})
    assert spec.profile == BatchProfile(1, 4, 8) and spec.kinds == (Kind.TENSORRT,)


@pytest.mark.gpu
def test_build_engines_builds_verifies_publishes_and_reuses_plans(tmp_path, tiny_vit_onnx):
    """`vitserve build-engines` on a repository as `make engines` leaves it (GPU hosts only)."""
    from dataclasses import asdict

    import onnxruntime as ort

    from vitserve.exporter.pipeline import VERIFY_SET, build_engines
    from vitserve.exporter.repository import Variant, write_model

    spec = _spec(precisions=(Precision.FP32, Precision.FP16), profile=BatchProfile(1, 2, 4))
    manifest = {**MANIFEST, "input": {"shape": [-1, 3, 8, 8]}}
    variants = [Variant(p, Kind.TENSORRT, tiny_vit_onnx) for p in spec.precisions]
    repo = tmp_path / "repo"
    written = write_model(repo, spec, manifest, variants, None)
    pixels = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_vit_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels}
    )
    for name in ("m_fp32_tensorrt", "m_fp16_tensorrt"):
        np.savez(repo / name / VERIFY_SET, pixels=pixels, fp32_sha256=np.array("x"), ref_embeddings=ref[0])
        (repo / name / "warmup").mkdir()
        (repo / name / "warmup" / "pixel_values.bin").write_bytes(pixels[0].tobytes())
    config = {k: v for k, v in asdict(spec).items() if k != "gates"} | {"gates": asdict(spec.gates)}
    summary = {"models": {"m": {"config": config, "triton_models": written, "engines": {}}}}
    (repo / "vitserve-manifest.json").write_text(json.dumps(summary, default=str))

    first = build_engines(repo, tmp_path / "cache")["models"]["m"]["engines"]
    assert all(e["built"] and e["published"] and not e["cached"] for e in first.values())
    assert engine.check_repository(repo) == []
    second = build_engines(repo, tmp_path / "cache")["models"]["m"]["engines"]
    assert all(e["cached"] for e in second.values())
    assert {n: e["plan_sha256"] for n, e in first.items()} == {n: e["plan_sha256"] for n, e in second.items()}
