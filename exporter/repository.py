"""Stage 4, artifacts -> Triton model repository.

Per model `NAME` of models.yaml:
  NAME_preprocess                python backend: encoded image bytes -> pixel_values (the backbone's
                                 own eval transform), bad images fail only their request
  NAME_{precision}_{kind}        the backbone: `cpu` (python backend running onnxruntime, for the pip
                                 tritonserver), `onnxruntime` (onnxruntime_onnx, GPU) or `tensorrt`
                                 (tensorrt_plan, with a build.sh next to the plan)
  NAME                           ensemble: `image` bytes -> `embeddings`, `logits`, `probs`
Configs are written through Triton's protobuf schema (model_config_pb2 + text_format), never by string
templates, and can be read back with `read_config`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitserve.errors import ConfigError
from vitserve.exporter.config import Kind, ModelSpec, Precision, check_kind_serves

TRITON_MODELS = Path(__file__).parent / "triton_models"
REPOSITORY_MANIFEST = "vitserve-manifest.json"
IMAGE_INPUT = "image"
PIXELS = "pixel_values"


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def config_text(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def write_config(model_dir: Path, cfg) -> Path:
    """Write config.pbtxt (protobuf text format) into `model_dir`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(config_text(cfg))
    return path


def read_config(path: str | Path):
    """Parse a config.pbtxt back into a ModelConfig (raises on anything Triton's schema refuses)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), _pb().ModelConfig())


def backbone_model_name(model: str, precision: Precision | str, kind: Kind | str) -> str:
    return f"{model}_{Precision(precision).value}_{Kind(kind).value}"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _dtype(dtype: str):
    return {"float32": _pb().TYPE_FP32}[dtype]


def _common(cfg, spec: ModelSpec, gpu: bool) -> None:
    mc = _pb()
    cfg.max_batch_size = spec.profile.max
    preferred = [b for b in spec.dynamic_batching.preferred_batch_sizes if b <= spec.profile.max]
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = spec.dynamic_batching.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(kind=kind, count=spec.instances)
    cfg.version_policy.latest.num_versions = 1


@dataclass(frozen=True)
class Variant:
    """A published backbone variant: an ONNX file (or plan) for one precision and serving kind."""

    precision: Precision
    kind: Kind
    onnx: Path  # the ONNX the variant is (or will be) built from
    external_data: Path | None = None


def backbone_config(name: str, spec: ModelSpec, manifest: dict[str, Any], variant: Variant):
    """ModelConfig of a backbone model for `variant`."""
    mc = _pb()
    check_kind_serves(variant.kind, variant.precision)
    cfg = mc.ModelConfig(name=name)
    size = manifest["input"]["shape"][2]
    if variant.kind is Kind.CPU:
        cfg.backend = "python"
        threads = max(1, (os.cpu_count() or 1) // spec.instances)
        optimization = "extended" if variant.precision is Precision.FP16 else "all"  # see onnxrt.cpu_session
        cfg.parameters["onnx_cpu"].string_value = json.dumps(
            {"intra_op_threads": threads, "optimization": optimization}
        )
    elif variant.kind is Kind.ONNXRUNTIME:
        cfg.platform = "onnxruntime_onnx"
        cfg.backend = "onnxruntime"
    else:
        cfg.platform = "tensorrt_plan"
        cfg.backend = "tensorrt"
    _common(cfg, spec, gpu=variant.kind is not Kind.CPU)
    cfg.input.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, size, size])
    _add_outputs(cfg, manifest)
    warm = cfg.model_warmup.add(name="zeros_batch1", batch_size=1)
    warm.inputs[PIXELS].data_type = mc.TYPE_FP32
    warm.inputs[PIXELS].dims.extend([3, size, size])
    warm.inputs[PIXELS].zero_data = True
    return cfg


def _add_outputs(cfg, manifest: dict[str, Any]) -> None:
    mc = _pb()
    cfg.output.add(name="embeddings", data_type=mc.TYPE_FP32, dims=[manifest["feature_dim"]])
    classes = manifest["head"]["num_classes"]
    if classes:
        cfg.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[classes])
        cfg.output.add(name="probs", data_type=mc.TYPE_FP32, dims=[classes], label_filename="labels.txt")


def preprocess_config(name: str, spec: ModelSpec, manifest: dict[str, Any]):
    mc = _pb()
    size = manifest["input"]["shape"][2]
    cfg = mc.ModelConfig(name=name, backend="python")
    _common(cfg, spec, gpu=False)
    # No dynamic batching here: tritonserver 2.51 answers a batch holding one malformed BYTES request
    # (a length prefix past its buffer) with that error for every request of the batch. Decoding is a
    # per-image loop anyway; measured throughput was the same (tests/test_reliability.py).
    cfg.ClearField("dynamic_batching")
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, size, size])
    cfg.parameters["preprocess"].string_value = json.dumps(
        {**manifest["preprocess"], "max_pixels": spec.max_image_pixels}
    )
    return cfg


def ensemble_config(name: str, spec: ModelSpec, manifest: dict[str, Any], backbone: str):
    mc = _pb()
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=spec.profile.max)
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    _add_outputs(cfg, manifest)
    pre = cfg.ensemble_scheduling.step.add(model_name=f"{name}_preprocess", model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[PIXELS] = PIXELS
    step = cfg.ensemble_scheduling.step.add(model_name=backbone, model_version=-1)
    step.input_map[PIXELS] = PIXELS
    for out in cfg.output:
        step.output_map[out.name] = out.name
    return cfg


def serving_variant(spec: ModelSpec, published: list[Variant]) -> Variant:
    """The variant the ensemble routes to: the first configured kind, its preferred published precision
    (CPU: cpu-int8, then fp32; GPU: fp16, then fp32)."""
    kind = spec.kinds[0]
    order = {
        Kind.CPU: (Precision.CPU_INT8, Precision.FP32),
        Kind.TENSORRT: (Precision.FP16, Precision.FP32, Precision.INT8),
        Kind.ONNXRUNTIME: (Precision.FP32, Precision.FP16),
    }[kind]
    for precision in order:
        for v in published:
            if v.kind is kind and v.precision is precision:
                return v
    raise ConfigError(f"model {spec.name}: no published variant can be served by kind {kind.value}")


def write_model(
    repo: Path,
    spec: ModelSpec,
    manifest: dict[str, Any],
    variants: list[Variant],
    labels: Path | None,
) -> dict[str, Any]:
    """Write one configured model (preprocess, backbone variants, ensemble) into `repo`; returns what
    was written, by Triton model name."""
    written: dict[str, Any] = {}
    pre_name = f"{spec.name}_preprocess"
    pre_dir = repo / pre_name
    write_config(pre_dir, preprocess_config(pre_name, spec, manifest))
    _link_or_copy(TRITON_MODELS / "preprocess.py", pre_dir / "1" / "model.py")
    written[pre_name] = {"role": "preprocess"}
    for v in variants:
        name = backbone_model_name(spec.name, v.precision, v.kind)
        mdir = repo / name
        write_config(mdir, backbone_config(name, spec, manifest, v))
        if labels is not None:
            _link_or_copy(labels, mdir / "labels.txt")
        if v.kind is Kind.CPU:
            _link_or_copy(TRITON_MODELS / "onnx_cpu.py", mdir / "1" / "model.py")
        if v.kind in (Kind.CPU, Kind.ONNXRUNTIME):
            _link_or_copy(v.onnx, mdir / "1" / "model.onnx")
            if v.external_data is not None:
                _link_or_copy(v.external_data, mdir / "1" / v.external_data.name)
        else:
            # the ONNX travels with the repository so build.sh can run inside the serving container
            _link_or_copy(v.onnx, mdir / "onnx" / "model.onnx")
            if v.external_data is not None:
                _link_or_copy(v.external_data, mdir / "onnx" / v.external_data.name)
            (mdir / "1").mkdir(parents=True, exist_ok=True)
        written[name] = {"role": "backbone", "precision": v.precision.value, "kind": v.kind.value}
    serve = serving_variant(spec, variants)
    ens_dir = repo / spec.name
    serve_name = backbone_model_name(spec.name, serve.precision, serve.kind)
    write_config(ens_dir, ensemble_config(spec.name, spec, manifest, serve_name))
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)
    if labels is not None:
        _link_or_copy(labels, ens_dir / "labels.txt")
    written[spec.name] = {"role": "ensemble", "backbone": serve_name}
    return written
