"""Engine stage: ONNX -> TensorRT plan (`model.plan` for Triton's tensorrt_plan backend).

The network is strongly typed: precision comes from the ONNX itself (ModelOpt AutoCast for FP16,
explicit Q/DQ nodes for INT8), never from builder flags. TensorRT 11 removed BuilderFlag.FP16/INT8 and
the INT8 calibrator, makes every network strongly typed and keeps the STRONGLY_TYPED creation flag and
trtexec's `--stronglyTyped` only as no-ops (TensorRT 11.1 source: python/src/infer/pyCore.cpp,
samples/common/sampleOptions.cpp; "Migrating from TensorRT 10.x to 11.x" in the TensorRT docs). We still
pass both, because on TensorRT 10.x they are what makes the build strongly typed.

A plan is tied to the TensorRT version that built it and to the GPU architecture it was built on.
`hardware_compatibility="ampere+"` lifts the second tie (Ampere and newer, some speed lost) and
`version_compatible=True` lifts the first for later TensorRT releases of the same major version;
Triton then needs `--backend-config=tensorrt,version-compatible=true` (tensorrt_backend README).
Otherwise build inside the very NGC container that will serve the plan: Triton's TensorRT backend uses
the TensorRT shipped in its image. `write_build_script` writes that recipe as a `build.sh`.

Which TensorRT each Triton image carries (checked 2026-11-27): triton-inference-server/server
`docs/introduction/compatibility.md` (commit e1db8a6, 2026-08-19) lists, for the
`nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3` images, TensorRT 10.11.0.33 in 25.08-25.10,
10.13.3.9 in 25.11-26.02 and 10.14.1.48 in 26.03-26.07. For the plain `<yy.mm>-py3` image it points to
NVIDIA's Frameworks Support Matrix, which we could not read; no Triton release we could read names
TensorRT 11. So check inside the image (trtexec prints its version first, `[TensorRT v110100]`) and
compare it with the `tensorrt_version` recorded by `build_engine`. The release vitserve serves from
is named in one place, `vitserve.exporter.gpu_release`; the serving image reads its TensorRT from its
own libnvinfer while it is built. `check_repository` (the
`vitserve check-engines` command, run by the serving image before tritonserver) refuses plans whose
recorded TensorRT version or compute capability do not match the host.

Plans and the timing cache live under artifacts/ (`plan_cache_key`): an unchanged rebuild copies the
plan instead of building it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.errors import ConfigError, ExportError
from vitserve.exporter.config import BatchProfile
from vitserve.exporter.export import sha256_file
from vitserve.exporter.gpu_release import IMAGE_TENSORRT_RECORD, TENSORRT_VERSION, TRITON_IMAGE, version_tuple

log = logging.getLogger(__name__)

MAX_BUILDER_OPTIMIZATION_LEVEL = 5  # trtexec --help: "integers from 0 to ... currently 5"

# Our spelling -> (trt.HardwareCompatibilityLevel member, trtexec --hardwareCompatibilityLevel value).
HARDWARE_COMPATIBILITY = {
    "ampere+": ("AMPERE_PLUS", "ampere+"),
    "same-compute-capability": ("SAME_COMPUTE_CAPABILITY", "sameComputeCapability"),
}

CONTAINER_HINT = (
    "run the build.sh next to it inside the NGC Triton container (nvcr.io/nvidia/tritonserver) that "
    "will serve the engine, on the GPU model it will serve on"
)


def check_profile(profile: BatchProfile, max_batch_size: int) -> None:
    """Refuse a batch profile the model cannot take, naming the numbers, before anything is built.

    BatchProfile refuses min > opt > max when it is made; this adds the model's own limit (its max batch
    size), so a bad profile fails here and not minutes into a TensorRT build.
    """
    if not profile.min <= profile.opt <= profile.max:
        raise ConfigError(
            f"batch profile must have min <= opt <= max, got min={profile.min} opt={profile.opt} max={profile.max}"
        )
    profile.check_within(max_batch_size)


@dataclass(frozen=True)
class EngineSettings:
    """How to build one plan: batch profile, builder effort, timing cache and portability options."""

    profile: BatchProfile
    builder_optimization_level: int = 3
    timing_cache: Path | None = None
    hardware_compatibility: str | None = None  # None | "ampere+" | "same-compute-capability"
    version_compatible: bool = False
    workspace_mb: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", BatchProfile.parse(self.profile))
        level = self.builder_optimization_level
        if (
            not isinstance(level, int)
            or isinstance(level, bool)
            or not 0 <= level <= MAX_BUILDER_OPTIMIZATION_LEVEL
        ):
            raise ConfigError(
                f"builder_optimization_level={level!r}: must be an integer from 0 to "
                f"{MAX_BUILDER_OPTIMIZATION_LEVEL}"
            )
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if (
            self.hardware_compatibility is not None
            and self.hardware_compatibility not in HARDWARE_COMPATIBILITY
        ):
            choices = ", ".join(repr(c) for c in HARDWARE_COMPATIBILITY)
            raise ConfigError(
                f"hardware_compatibility={self.hardware_compatibility!r}: expected None or one of {choices}"
            )
        if not isinstance(self.version_compatible, bool):
            raise ConfigError(f"version_compatible={self.version_compatible!r}: must be true or false")
        mb = self.workspace_mb
        if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
            raise ConfigError(f"workspace_mb={mb!r}: must be a positive integer (MiB) or None")


def _check_io(input_name: str, chw: tuple[int, int, int]) -> None:
    # trtexec's shape spec is "name:1x3x224x224[,name2:...]", so these characters cannot be passed.
    if not input_name or not input_name.isprintable() or any(c in input_name for c in ":,'\" "):
        raise ConfigError(f"input name {input_name!r}: must be non-empty, without ':', ',', quotes or spaces")
    if len(chw) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in chw):
        raise ConfigError(f"input shape {chw!r}: expected three positive integers (channels, height, width)")


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
) -> list[str]:
    """The trtexec argv that builds the same plan as `build_engine` (flag spellings from TensorRT 11.1).

    Paths are used as given, so the caller decides whether they are relative (build.sh) or absolute.
    """
    _check_io(input_name, chw)
    c, h, w = chw
    p = settings.profile

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x{c}x{h}x{w}"

    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--minShapes={shape(p.min)}",
        f"--optShapes={shape(p.opt)}",
        f"--maxShapes={shape(p.max)}",
        "--stronglyTyped",
    ]
    if settings.timing_cache is not None:
        cmd.append(f"--timingCacheFile={settings.timing_cache}")
    cmd += [f"--saveEngine={plan_path}", f"--builderOptimizationLevel={settings.builder_optimization_level}"]
    if settings.workspace_mb is not None:
        cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    if settings.hardware_compatibility is not None:
        cmd.append(
            f"--hardwareCompatibilityLevel={HARDWARE_COMPATIBILITY[settings.hardware_compatibility][1]}"
        )
    if settings.version_compatible:
        cmd.append("--versionCompatible")
    cmd.append("--skipInference")  # build only; run_engine and the parity checks verify numbers
    return cmd


def _atomic_write(path: Path, data: bytes | memoryview, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _relative_to(path: Path, directory: Path) -> str:
    """`path` as seen from `directory`: relative when they share a top folder, else absolute."""
    path, directory = Path(os.path.abspath(path)), Path(os.path.abspath(directory))
    if os.path.commonpath([path, directory]) == path.anchor:
        return str(path)
    return os.path.relpath(path, directory)


def _flag_value(cmd: list[str], prefix: str) -> str:
    """The value of the `prefix` flag (e.g. "--saveEngine=") in a trtexec argv."""
    return next(a[len(prefix) :] for a in cmd if a.startswith(prefix))


def write_build_script(
    directory: str | Path,
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
) -> Path:
    """Write `directory/build.sh`: the trtexec command that builds the plan, to run in the serving container.

    Paths inside are relative to the script's own folder (it cd's there first), so the tree can be moved
    or mounted elsewhere as a whole. Written to a temporary name and renamed when whole.
    """
    directory = Path(directory)
    for path in (directory, onnx_path, plan_path, settings.timing_cache):
        if path is not None and not str(path).isprintable():
            raise ConfigError(f"path {str(path)!r}: line breaks and control characters cannot go in build.sh")
    timing_cache = settings.timing_cache
    if timing_cache is not None:
        timing_cache = Path(_relative_to(timing_cache, directory))
    cmd = trtexec_command(
        _relative_to(Path(onnx_path), directory),
        _relative_to(Path(plan_path), directory),
        input_name,
        chw,
        replace(settings, timing_cache=timing_cache),
    )
    p = settings.profile
    outputs = [_flag_value(cmd, "--saveEngine=")] + ([str(timing_cache)] if timing_cache is not None else [])
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    script = f"""#!/usr/bin/env bash
# Builds the TensorRT plan {shlex.quote(_flag_value(cmd, "--saveEngine="))} (written by vitserve.exporter.engine).
#
# Run it INSIDE the NGC Triton container that will serve the plan ({TRITON_IMAGE}: TensorRT
# {TENSORRT_VERSION} expected, unverified; the serving image records its own in {IMAGE_TENSORRT_RECORD};
# `make engines-gpu` does this for every plan, with caching and verification), on the
# GPU model it will run on: a plan only loads in the TensorRT version that built it and, unless built
# with a hardware compatibility level, on the same GPU architecture. trtexec prints its TensorRT version
# on its first line.
#
# Input {input_name}: batch min={p.min} opt={p.opt} max={p.max}, {chw[0]}x{chw[1]}x{chw[2]}. The network is
# strongly typed: FP16/INT8 come from the ONNX (AutoCast / Q/DQ), not from trtexec flags.
# Set TRTEXEC=/path/to/trtexec when it is not on PATH.
set -euo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if ! command -v "$TRTEXEC" >/dev/null; then
    echo "trtexec not found (looked on PATH and at $TRTEXEC); run this inside the Triton container" >&2
    exit 127
fi
mkdir -p {" ".join(shlex.quote(os.path.dirname(o) or ".") for o in outputs)}

"$TRTEXEC" \\
    {args}
"""
    path = directory / "build.sh"
    _atomic_write(path, script.encode(), mode=0o755)
    return path


def _gpu() -> tuple[str | None, str | None]:
    """(GPU name, compute capability "9.0") of device 0, or (None, None) when no GPU is visible.

    Asks torch, then cuda-python, then `nvidia-smi` (the serving image has neither Python package).
    """
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, prop = cudart.cudaGetDeviceProperties(0)
        if err == cudart.cudaError_t.cudaSuccess:
            name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
            return name, f"{prop.major}.{prop.minor}"
    except ImportError:
        pass
    return _nvidia_smi_gpu()


def _nvidia_smi_gpu() -> tuple[str | None, str | None]:
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    name, _, cap = out.stdout.strip().partition(",")
    if out.returncode != 0 or not name:
        return None, None
    return name.strip(), (cap.strip() or None)


def tensorrt_version() -> str | None:
    """The TensorRT version on this host: that of the libnvinfer the dynamic loader finds (what Triton's
    TensorRT backend loads), else the `tensorrt` Python package's; None when there is neither.

    libnvinfer's getInferLibVersion() is MAJOR*10000 + MINOR*100 + PATCH from TensorRT 10 on
    (MAJOR*1000 + MINOR*100 + PATCH before), so it gives "10.13.3" without the build number.
    """
    import ctypes

    for lib in ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so"):
        try:
            n = int(ctypes.CDLL(lib).getInferLibVersion())
        except (OSError, AttributeError):
            continue
        if n >= 100000:
            return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
        return f"{n // 1000}.{n // 100 % 10}.{n % 100}"
    try:
        import tensorrt as trt

        return trt.__version__
    except (ImportError, OSError, RuntimeError):
        return None


def tensorrt_unavailable_reason() -> str | None:
    """None when `import tensorrt` works and a CUDA GPU is visible, else why not (for messages and skips)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # a wheel without its libraries fails with these
        return f"the tensorrt Python package cannot be imported ({e})"
    if _gpu()[0] is None:
        return "no CUDA GPU is visible"
    return None


def _tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ExportError(f"TensorRT not available: {reason}")
    import tensorrt as trt

    return trt


def engine_metadata(settings: EngineSettings) -> dict[str, Any]:
    """What a plan built now with `settings` is tied to: TensorRT version, GPU, profile and build options.

    Unknown fields (no TensorRT, no GPU) are None. `build_engine` adds build time and the plan's sha256.
    """
    gpu_name, capability = _gpu()
    p = settings.profile
    return {
        "tensorrt_version": tensorrt_version(),
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "profile": {"min": p.min, "opt": p.opt, "max": p.max},
        "builder_optimization_level": settings.builder_optimization_level,
        "hardware_compatibility": settings.hardware_compatibility,
        "version_compatible": settings.version_compatible,
        "workspace_mb": settings.workspace_mb,
    }


_LOGGER = None  # TensorRT keeps the first ILogger it is given for the whole process: make exactly one


def _logger(trt):
    """The process's one TensorRT logger, its error list emptied for the call about to use it."""
    global _LOGGER
    if _LOGGER is None:

        class Logger(trt.ILogger):
            """Forwards TensorRT messages to logging and keeps the errors for the exception message."""

            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _LOGGER = Logger()
    _LOGGER.errors.clear()
    return _LOGGER


def strongly_typed_flags(trt) -> int:
    """Network creation flags for a strongly typed network; refuses a TensorRT without them.

    A weakly typed network would let TensorRT choose precisions itself and ignore the FP16/INT8 decided
    in the ONNX (no FP16/INT8 builder flags are set), so there is no fallback to it.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise ExportError(
            f"TensorRT {getattr(trt, '__version__', '?')} cannot build strongly typed networks "
            "(NetworkDefinitionCreationFlag.STRONGLY_TYPED, TensorRT 9.1 and later); the FP16/INT8 "
            f"variants need them. Build inside the serving image ({TRITON_IMAGE} and its TensorRT): make engines-gpu"
        )
    return 1 << int(flag)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
    *,
    max_batch_size: int | None = None,
    write_script: bool = True,
) -> dict[str, Any]:
    """Build a strongly typed TensorRT plan from `onnx_path` and write it to `plan_path`; return its metadata.

    Writes `build.sh` (the equivalent trtexec command) next to the plan first, then, when TensorRT and a GPU
    are present, parses the ONNX (every parser error is reported), builds with one optimization profile
    over the batch axis and writes the plan atomically. The timing cache, when set, is loaded if present
    and saved after the build. Without TensorRT it raises ExportError naming the build.sh to run instead.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    _check_io(input_name, chw)
    if max_batch_size is not None:
        check_profile(settings.profile, max_batch_size)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist; run the export stage first")
    script = plan_path.parent / "build.sh"
    if write_script:
        write_build_script(plan_path.parent, onnx_path, plan_path, input_name, chw, settings)

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ExportError(
            f"TensorRT not available: {reason}. To build {plan_path.name}, {CONTAINER_HINT}: {script}"
        )
    import tensorrt as trt

    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise ExportError(
            f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n  " + "\n  ".join(errors)
        )
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise ExportError(f"{onnx_path} has no input {input_name!r}; its inputs are {sorted(inputs)}")
    batch, *dims = inputs[input_name]
    if len(dims) != 3 or any(d not in (-1, want) for d, want in zip(dims, chw, strict=True)):
        raise ExportError(
            f"{onnx_path} input {input_name!r} has shape {inputs[input_name]}, expected [batch, "
            f"{chw[0]}, {chw[1]}, {chw[2]}]"
        )
    p = settings.profile
    if batch != -1 and not p.min == p.max == batch:
        raise ExportError(
            f"{onnx_path} input {input_name!r} has a fixed batch of {batch}, so profile "
            f"min={p.min} opt={p.opt} max={p.max} cannot be built; export it with a dynamic batch axis"
        )

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (p.min, *chw), (p.opt, *chw), (p.max, *chw))
    config.add_optimization_profile(profile)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.hardware_compatibility is not None:
        member = HARDWARE_COMPATIBILITY[settings.hardware_compatibility][0]
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = settings.timing_cache
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ExportError(
                f"timing cache {cache_path} cannot be used here (corrupt, or made on another GPU or "
                "TensorRT version); delete it or give each GPU/TensorRT pair its own file"
            )

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "\n  ".join(logger.errors) or "no error message from TensorRT"
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}:\n  {detail}")
    data = memoryview(plan)
    _atomic_write(plan_path, data)
    if cache_path is not None:
        _atomic_write(cache_path, memoryview(config.get_timing_cache().serialize()))
    meta = engine_metadata(settings)
    meta.update(
        build_seconds=round(seconds, 3),
        plan_sha256=hashlib.sha256(data).hexdigest(),
        plan_bytes=data.nbytes,
        input_name=input_name,
        chw=list(chw),
    )
    return meta


def run_engine(
    plan_path: str | Path, pixel_values: np.ndarray, *, version_compatible: bool = False
) -> dict[str, np.ndarray]:
    """Run a plan once on the GPU (for verification): `pixel_values` [N, C, H, W] -> {output name: array}.

    Deserializes with the process's logger, checks the batch against the plan's profile, then runs it with
    Polygraphy's TrtRunner (device buffers through libcudart, no torch: the serving image has none).
    `version_compatible=True` lets TensorRT run the lean runtime embedded in such plans.
    """
    trt = _tensorrt()
    from polygraphy.backend.trt import TrtRunner

    plan_path = Path(plan_path)
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        detail = "; ".join(logger.errors)
        raise ExportError(
            f"TensorRT could not load {plan_path} ({detail}); plans only load with the TensorRT version and "
            "GPU architecture that built them"
        )
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise ExportError(f"{plan_path} has inputs {inputs}; run_engine feeds exactly one")
    name = inputs[0]
    lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
    shape = tuple(pixel_values.shape)
    if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
        raise ExportError(f"{plan_path}: input {name} shape {shape} is outside the profile {lo}..{hi}")
    dtype = trt.nptype(engine.get_tensor_dtype(name))
    feed = {name: np.ascontiguousarray(pixel_values, dtype=dtype)}
    try:
        with TrtRunner(engine) as runner:
            # copies: the runner reuses its host buffers
            return {n: np.array(v, copy=True) for n, v in runner.infer(feed_dict=feed).items()}
    except Exception as e:  # Polygraphy reports TensorRT's failures as its own exception types
        detail = "; ".join(logger.errors) or str(e)
        raise ExportError(f"TensorRT failed to run {plan_path}: {detail}") from e


# ----------------------------------------------------------------------------------------- provenance


def host_provenance() -> dict[str, Any]:
    """What a plan must match on this host: TensorRT version, GPU name and compute capability."""
    gpu_name, capability = _gpu()
    return {"tensorrt_version": tensorrt_version(), "gpu_name": gpu_name, "compute_capability": capability}


def _capability(value: Any) -> tuple[int, int] | None:
    try:
        major, minor = str(value).split(".")
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def provenance_problems(name: str, recorded: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """Why the plan of Triton model `name`, built as `recorded` (its manifest entry), will not load on
    `host` (`host_provenance()`); empty when it will.

    TensorRT: the same major.minor.patch, or with `version_compatible` the same major and a host that is
    not older. GPU: the same compute capability, or with hardware compatibility "ampere+" any 8.0 or newer.
    Each message names both sides and how to rebuild.
    """
    rebuild = (
        f"rebuild it on this host: `make engines-gpu` (builds inside {TRITON_IMAGE}, with the TensorRT "
        f"that image serves with), or run {name}/1/build.sh inside the serving container"
    )
    built_trt, host_trt = recorded.get("tensorrt_version"), host.get("tensorrt_version")
    built_cc, host_cc = recorded.get("compute_capability"), host.get("compute_capability")
    problems = []
    if not built_trt or not built_cc:
        problems.append(
            f"{name}: the manifest records no TensorRT version / compute capability for its plan "
            f"(tensorrt_version={built_trt!r}, compute_capability={built_cc!r}), so it cannot be checked; {rebuild}"
        )
        return problems
    if not host_trt:
        problems.append(f"{name}: no TensorRT found on this host (plan built with TensorRT {built_trt})")
    else:
        try:
            b, h = version_tuple(built_trt), version_tuple(host_trt)
        except ValueError as e:
            problems.append(f"{name}: {e}")
        else:
            ok = (b[0] == h[0] and h >= b) if recorded.get("version_compatible") else b == h
            if not ok:
                problems.append(
                    f"{name}: plan built with TensorRT {built_trt}, this host has TensorRT {host_trt} "
                    f"(a plan only loads in the TensorRT that built it); {rebuild}"
                )
    b_cc, h_cc = _capability(built_cc), _capability(host_cc)
    if h_cc is None:
        problems.append(f"{name}: no GPU visible on this host (plan built for compute capability {built_cc})")
    elif b_cc is None:
        problems.append(f"{name}: recorded compute capability {built_cc!r} is not like '9.0'; {rebuild}")
    else:
        ok = h_cc >= (8, 0) if recorded.get("hardware_compatibility") == "ampere+" else b_cc == h_cc
        if not ok:
            problems.append(
                f"{name}: plan built for compute capability {built_cc} ({recorded.get('gpu_name')}), this "
                f"host's GPU has {host_cc} ({host.get('gpu_name')}); {rebuild}"
            )
    return problems


def check_repository(repository: str | Path, host: dict[str, Any] | None = None) -> list[str]:
    """Every TensorRT plan of a vitserve repository against `host` (default: this host's provenance).

    Reads `vitserve-manifest.json`: a plan with no manifest entry, whose bytes differ from the recorded
    sha256, or whose TensorRT version / compute capability do not match is a problem. Returns the list
    of problems (empty: every plan will load).
    """
    repository = Path(repository)
    manifest_path = repository / "vitserve-manifest.json"
    plans = sorted(repository.glob("*/1/model.plan"))
    if not plans:
        return []
    if not manifest_path.is_file():
        return [f"{repository}: has TensorRT plans but no vitserve-manifest.json to check them against"]
    records: dict[str, dict[str, Any]] = {}
    for model in json.loads(manifest_path.read_text()).get("models", {}).values():
        records.update(model.get("engines") or {})
    host = host_provenance() if host is None else host
    problems = []
    for plan in plans:
        name = plan.parent.parent.name
        rec = records.get(name)
        if not rec or not rec.get("built", True):
            problems.append(
                f"{name}: {plan} is not recorded in {manifest_path}; rebuild with `make engines-gpu`"
            )
            continue
        sha = rec.get("plan_sha256")
        if sha and sha != sha256_file(plan):
            problems.append(
                f"{name}: {plan} is not the plan recorded in the manifest (sha256 differs); rebuild with "
                "`make engines-gpu`"
            )
            continue
        problems += provenance_problems(name, rec, host)
    return problems


# ----------------------------------------------------------------------------------------- plan cache


def onnx_digest(onnx_path: str | Path) -> str:
    """The content of an ONNX model: its graph and every external-data file (`identity.model_digest`)."""
    from vitserve.exporter.identity import model_digest

    return model_digest(onnx_path)


def plan_cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
    settings: EngineSettings,
    input_name: str,
    chw: tuple[int, int, int],
) -> str:
    """What decides a plan's bytes: the ONNX, the TensorRT version and GPU architecture that build it, the
    profile, the builder optimization level and the other build options (not the timing cache path)."""
    from vitserve.exporter.identity import artifact_key

    p = settings.profile
    return artifact_key(
        "tensorrt-plan",
        length=24,
        onnx=onnx_sha256,
        tensorrt=tensorrt_version,
        compute_capability=compute_capability,
        profile=[p.min, p.opt, p.max],
        builder_optimization_level=settings.builder_optimization_level,
        hardware_compatibility=settings.hardware_compatibility,
        version_compatible=settings.version_compatible,
        workspace_mb=settings.workspace_mb,
        input=[input_name, *chw],
    )


def timing_cache_path(cache_dir: str | Path, tensorrt_version: str, compute_capability: str) -> Path:
    """The timing cache shared by every build with one TensorRT version on one GPU architecture."""
    return Path(cache_dir) / "timing" / f"trt{tensorrt_version}-sm{compute_capability}.cache"


def cached_plan(cache_dir: str | Path, key: str, plan_path: str | Path) -> dict[str, Any] | None:
    """Copy the cached plan of `key` to `plan_path` and return its metadata (with `cached: True`), or None
    when there is none or its bytes no longer match the recorded sha256."""
    entry = Path(cache_dir) / key
    plan, meta_file = entry / "model.plan", entry / "meta.json"
    if not (plan.is_file() and meta_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("plan_sha256") != sha256_file(plan):
        log.warning("plan cache %s is damaged (sha256 differs); rebuilding", entry)
        return None
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=plan_path.parent, prefix=f".{plan_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(plan, tmp)
        os.replace(tmp, plan_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {**meta, "cached": True}


def store_plan(cache_dir: str | Path, key: str, plan_path: str | Path, meta: dict[str, Any]) -> Path:
    """Keep a built plan and its metadata under `cache_dir/key` (written whole, then renamed)."""
    entry = Path(cache_dir) / key
    tmp = Path(tempfile.mkdtemp(dir=Path(cache_dir), prefix=f".{key}.tmp-"))
    try:
        shutil.copyfile(plan_path, tmp / "model.plan")
        (tmp / "meta.json").write_text(json.dumps({**meta, "cache_key": key}, indent=2, default=str) + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def build_engine_cached(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
    cache_dir: str | Path,
    *,
    max_batch_size: int | None = None,
) -> dict[str, Any]:
    """`build_engine`, with plans and the timing cache kept in `cache_dir` (under artifacts/).

    Writes build.sh next to the plan (with `settings` as given). Then, when a plan for the same
    `plan_cache_key` is cached, copies it (seconds) instead of building; otherwise builds with the shared
    timing cache of this TensorRT version and GPU and stores the plan. Without TensorRT it raises
    ExportError like `build_engine`.
    """
    onnx_path, plan_path, cache_dir = Path(onnx_path), Path(plan_path), Path(cache_dir)
    write_build_script(plan_path.parent, onnx_path, plan_path, input_name, chw, settings)
    reason = tensorrt_unavailable_reason()
    if reason is not None or not onnx_path.is_file():
        return build_engine(
            onnx_path, plan_path, input_name, chw, settings, max_batch_size=max_batch_size, write_script=False
        )
    host = host_provenance()
    key = plan_cache_key(
        onnx_digest(onnx_path),
        str(host["tensorrt_version"]),
        str(host["compute_capability"]),
        settings,
        input_name,
        chw,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    hit = cached_plan(cache_dir, key, plan_path)
    if hit is not None:
        log.info("%s: plan unchanged (key %s), copied from %s", plan_path, key, cache_dir)
        return hit
    timing = timing_cache_path(cache_dir, host["tensorrt_version"], host["compute_capability"])
    meta = build_engine(
        onnx_path,
        plan_path,
        input_name,
        chw,
        replace(settings, timing_cache=timing),
        max_batch_size=max_batch_size,
        write_script=False,
    )
    meta["timing_cache"] = str(timing)
    store_plan(cache_dir, key, plan_path, meta)
    return {**meta, "cache_key": key, "cached": False}
