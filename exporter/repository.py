"""Stage 4, artifacts -> Triton model repository.

Per model `NAME` of models.yaml:
  NAME_preprocess                python backend: encoded image bytes -> pixel_values (the backbone's
                                 own eval transform), bad images fail only their request
  NAME_{precision}_{kind}        the backbone: `cpu` (python backend running onnxruntime, for the pip
                                 tritonserver), `onnxruntime` (onnxruntime_onnx, GPU) or `tensorrt`
                                 (tensorrt_plan, with a build.sh next to the plan)
  NAME                           ensemble: `image` bytes -> `embeddings`, `logits`, `probs`
and, for a CLIP model with `text: true` (exporter/text.py):
  NAME_text_tokenize             python backend: UTF-8 strings -> open_clip's tokens (bad strings fail only
                                 their request)
  NAME_text_{precision}_{kind}   the text tower: tokens -> embeddings (`cpu` or `onnxruntime`)
  NAME_text                      ensemble: `text` strings -> L2-normalised `embeddings` (the image space)
Configs are written through Triton's protobuf schema (model_config_pb2 + text_format), never by string
templates, and can be read back with `read_config`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitserve import contract
from vitserve.contract import (
    CPU_BACKBONE_SOURCE,
    EMBEDDINGS,
    FEATURES,
    IMAGE_INPUT,
    LABELS_FILE,
    LOGITS,
    ONNX_FILE,
    PIXELS,
    PREPROCESS_SOURCE,
    PROBE_FILE,
    PROBS,
    SERVED_CONTRACT,
    TEXT_INPUT,
    TOKENIZER_SOURCE,
    TOKENS,
    ContractError,
    CpuBackboneParams,
    PreprocessParams,
    TextParams,
    TunedMark,
    backbone_model_name,
    preprocess_model_name,
    text_model_name,
    tokenizer_model_name,
)
from vitserve.errors import ConfigError
from vitserve.exporter.config import Kind, ModelSpec, Precision, check_kind_serves
from vitserve.exporter.precision import PROBE_MIN_COSINE

log = logging.getLogger(__name__)
TRITON_MODELS = Path(__file__).parent / "triton_models"
REPOSITORY_MANIFEST = "vitserve-manifest.json"


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


def set_params(cfg, params) -> None:
    """Put a served model's typed parameters (contract.py) into its ModelConfig."""
    cfg.parameters[params.KEY].string_value = params.to_json()


def read_params(cfg, cls):
    """A served model's typed parameters (contract.py) from its ModelConfig, validated."""
    from google.protobuf import json_format

    return cls.from_model_config(json_format.MessageToDict(cfg, preserving_proto_field_name=True))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Artifacts (ONNX, labels, probe) are hard-linked where possible: they are large, and written once
    under a new name by every build (atomic_directory), never edited in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_served_source(source: str, version_dir: Path) -> None:
    """A python model's code into its version folder: `source` as model.py and the contract it imports,
    copied (never linked: editing a served model must not edit the package)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TRITON_MODELS / source, version_dir / "model.py")
    shutil.copyfile(contract.__file__, version_dir / SERVED_CONTRACT)


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
    # CPU kind: (flavour, source file) per flavour the served model may pick, and ("probe", file); see
    # onnx_cpu.py and pipeline.cpu_flavours
    flavours: tuple[tuple[str, Path], ...] = ()

    def served_files(self) -> dict[str, tuple[str, Path]]:
        """flavour (and "probe") -> (its file's name in the model's version folder, source): the variant's
        own ONNX is model.onnx; an FP32 flavour's file, when it is not that, is the FP32 fallback; another
        cpu-int8 flavour's is model.<flavour>.onnx."""
        out = {}
        for k, f in self.flavours:
            if k == "probe":
                out[k] = (PROBE_FILE, f)
            elif f == self.onnx:
                out[k] = (ONNX_FILE, f)
            elif k in contract.FP32_FLAVOURS:
                out[k] = (contract.FP32_FALLBACK_FILE, f)
            elif k in contract.INT8_ISAS:  # a cpu-int8 flavour beside another model.onnx (the INT8 variant's)
                out[k] = (f"model.{k}.onnx", f)
            else:
                out[k] = (f.name, f)
        return out


WARMUP_FILE = f"{PIXELS}.bin"  # warmup/ of each GPU backbone model: one preprocessed photo (pipeline)


def backbone_config(
    name: str, spec: ModelSpec, manifest: dict[str, Any], variant: Variant, cpu_share: int = 1
):
    """ModelConfig of a backbone model for `variant`.

    GPU kinds get what a GPU deployment sets: `backbone_instances` instances, warmup at the profile's opt
    batch with a real preprocessed photo (`warmup/pixel_values.bin`, written by the pipeline), CUDA graphs
    for TensorRT (one graph per opt and preferred batch size), and, opted in with `onnxruntime_trt_fp16`,
    onnxruntime's TensorRT execution accelerator in FP16.
    """
    mc = _pb()
    check_kind_serves(variant.kind, variant.precision)
    cfg = mc.ModelConfig(name=name)
    _, _, height, width = manifest["input"]["shape"]
    gpu = variant.kind is not Kind.CPU
    if variant.kind is Kind.CPU:
        cfg.backend = "python"
        # Threads are the serving host's, decided when the model loads (onnx_cpu.py), unless models.yaml
        # sets cpu_threads; `share` is how many CPU backbones of this repository serve at once.
        flavours = {k: n for k, (n, _) in variant.served_files().items() if k != "probe"}
        params = CpuBackboneParams(
            cpu_threads=spec.cpu_threads or "auto",
            share=cpu_share,
            # the INT8 Q/DQ graph is FP16 outside its quantized matmuls (make_int8): extended, like FP16,
            # where onnxruntime runs it; with flavours, OpenVINO runs it and onnxruntime only per-token / FP32
            optimization="extended"
            if variant.precision is Precision.FP16 or (variant.precision is Precision.INT8 and not flavours)
            else "all",
            cpu_spinning=spec.cpu_spinning,
            cpu_lanes=spec.cpu_lanes or "auto",
            flavours=flavours,
            probe=PROBE_FILE if flavours else None,
            probe_min_cosine=PROBE_MIN_COSINE if flavours else None,
            flavour=_tuned_flavour(spec, variant, flavours),
        )
        set_params(cfg, params)
    elif variant.kind is Kind.ONNXRUNTIME:
        cfg.platform = "onnxruntime_onnx"
        cfg.backend = "onnxruntime"
        if spec.onnxruntime_trt_fp16:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = "FP16"
            acc.parameters["max_workspace_size_bytes"] = str(4 << 30)
            acc.parameters["trt_engine_cache_enable"] = "1"
            acc.parameters["trt_engine_cache_path"] = "/tmp/vitserve-ort-trt-cache"
    else:
        cfg.platform = "tensorrt_plan"
        cfg.backend = "tensorrt"
        cfg.optimization.cuda.graphs = True
        p = spec.profile
        for batch in sorted({p.opt, *(b for b in spec.dynamic_batching.preferred_batch_sizes if b <= p.max)}):
            graph = cfg.optimization.cuda.graph_spec.add(batch_size=batch)
            graph.input[PIXELS].dim.extend([3, height, width])
    _common(cfg, spec, gpu=gpu)
    _mark_tuned(cfg, spec)
    if gpu and spec.backbone_instances is not None:
        cfg.instance_group[0].count = spec.backbone_instances
    cfg.input.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, height, width])
    _add_outputs(cfg, manifest)
    if gpu:
        warm = cfg.model_warmup.add(name=f"photo_batch{spec.profile.opt}", batch_size=spec.profile.opt)
        warm.inputs[PIXELS].input_data_file = WARMUP_FILE
    else:
        warm = cfg.model_warmup.add(name="zeros_batch1", batch_size=1)
        warm.inputs[PIXELS].zero_data = True
    warm.inputs[PIXELS].data_type = mc.TYPE_FP32
    warm.inputs[PIXELS].dims.extend([3, height, width])
    return cfg


def _tuned_flavour(spec: ModelSpec, variant: Variant, flavours: dict[str, str]) -> str | None:
    """The `tuned:` flavour pin of this CPU variant: the tuned precision's (any precision's when none is
    tuned) where the variant has that flavour."""
    t = spec.tuned
    if t is None or t.flavour is None or t.flavour not in flavours:
        return None
    return t.flavour if t.precision in (None, variant.precision) else None


def _mark_tuned(cfg, spec: ModelSpec) -> None:
    """Say in config.pbtxt (parameter `vitserve_tuned`) that `vitserve tune` chose these settings, where."""
    if spec.tuned is not None:
        t = spec.tuned
        set_params(cfg, TunedMark(t.host, t.p99_budget_ms, t.report, t.tuned_at))


def _add_outputs(cfg, manifest: dict[str, Any]) -> None:
    mc = _pb()
    cfg.output.add(name=EMBEDDINGS, data_type=mc.TYPE_FP32, dims=[manifest["feature_dim"]])
    if FEATURES in manifest["outputs"]:  # a backbone shared by several heads (multihead.py)
        cfg.output.add(name=FEATURES, data_type=mc.TYPE_FP32, dims=[manifest["feature_dim"]])
    classes = manifest["head"]["num_classes"]
    if classes:
        cfg.output.add(name=LOGITS, data_type=mc.TYPE_FP32, dims=[classes])
        cfg.output.add(name=PROBS, data_type=mc.TYPE_FP32, dims=[classes], label_filename=LABELS_FILE)


def preprocess_instances(spec: ModelSpec) -> int:
    """Instances of NAME_preprocess: `preprocess_instances`, else the cores the backbone leaves, at least 1
    (GPU first kind: every core; CPU kind: the backbone's onnxruntime threads take all cores unless
    `cpu_threads` pins them). DALI runs one instance per GPU, its CPU threads set by `num_threads`."""
    if spec.preprocess_instances is not None:
        return spec.preprocess_instances
    cores = os.cpu_count() or 1
    if spec.kinds[0] != Kind.CPU:
        return 1 if spec.preprocess == "dali" else cores
    if spec.cpu_threads:
        return max(1, cores - spec.instances * spec.cpu_threads)
    return 1


def _image_input(cfg, spec: ModelSpec) -> None:
    """The encoded-image input: BYTES for the python model; for DALI, raw bytes as UINT8 [-1] (what Triton's
    DALI backend takes), one image per batch row, of any length (ragged batching)."""
    mc = _pb()
    if spec.preprocess == "dali":
        cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    else:
        cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])


def preprocess_params(spec: ModelSpec, manifest: dict[str, Any]) -> PreprocessParams:
    """The python NAME_preprocess model's parameters: the model's one pixel recipe
    (`ModelSpec.served_preprocess`) and how it is served."""
    recipe = spec.served_preprocess(manifest)
    try:
        return PreprocessParams(
            **recipe.as_dict(),
            max_image_pixels=spec.max_image_pixels,
            preprocess=spec.preprocess,
            preprocess_threads=spec.preprocess_threads,
        )
    except ContractError as e:
        raise ConfigError(f"model {spec.name}: {e}") from None


def preprocess_config(name: str, spec: ModelSpec, manifest: dict[str, Any]):
    """NAME_preprocess: the python model (pillow / fast) or the DALI model (`model.dali`)."""
    mc = _pb()
    size = manifest["input"]["shape"][2]
    if spec.preprocess == "dali":
        cfg = mc.ModelConfig(name=name, backend="dali")
        _common(cfg, spec, gpu=True)  # dynamic batching from models.yaml
        cfg.instance_group[0].count = preprocess_instances(spec)
        cfg.parameters["num_threads"].string_value = str(os.cpu_count() or 1)
    else:
        cfg = mc.ModelConfig(name=name, backend="python")
        _common(cfg, spec, gpu=False)
        cfg.instance_group[0].count = preprocess_instances(spec)
        # No dynamic batching here: tritonserver 2.51's python backend checks each BYTES element's length
        # prefix while it gathers a batch, and fails every request of the batch for one malformed request
        # (a prefix past its buffer), before model.py runs; parallelism comes from the instances (and, within
        # one request of several images, from `preprocess_threads`).
        cfg.ClearField("dynamic_batching")
        set_params(cfg, preprocess_params(spec, manifest))
    _image_input(cfg, spec)
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, size, size])
    return cfg


def ensemble_front(name: str, spec: ModelSpec, backbone: str):
    """An ensemble `name` taking `image` bytes through `{spec.name}_preprocess` into `backbone`; returns
    (config, the backbone's step) for the caller to add outputs and further steps."""
    cfg = _pb().ModelConfig(name=name, platform="ensemble", max_batch_size=spec.profile.max)
    _image_input(cfg, spec)
    pre = cfg.ensemble_scheduling.step.add(model_name=preprocess_model_name(spec.name), model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[PIXELS] = PIXELS
    step = cfg.ensemble_scheduling.step.add(model_name=backbone, model_version=-1)
    step.input_map[PIXELS] = PIXELS
    return cfg, step


def ensemble_config(name: str, spec: ModelSpec, manifest: dict[str, Any], backbone: str):
    cfg, step = ensemble_front(name, spec, backbone)
    _add_outputs(cfg, manifest)
    for out in cfg.output:
        step.output_map[out.name] = out.name
    _mark_tuned(cfg, spec)
    return cfg


def serving_variant(spec: ModelSpec, published: list[Variant]) -> Variant:
    """The variant the ensemble routes to: the first configured kind, its preferred published precision
    (CPU: cpu-int8 where asked for, int8, bf16, then fp32; GPU: fp16, then fp32). A `tuned:` precision comes first when it is published
    for the CPU kind; when it is not (its gate failed in this build) the default order decides, with a warning."""
    kind = spec.kinds[0]
    tuned = spec.tuned.precision if spec.tuned is not None else None
    if tuned is not None and kind is Kind.CPU:
        for v in published:
            if v.kind is kind and v.precision is tuned:
                return v
        log.warning(
            "model %s: tuned precision %s is not published in this build; routing by the default order",
            spec.name, tuned.value,
        )  # fmt: skip
    order = {
        # cpu-int8 is published only where models.yaml asks for it (cpu_precisions): asked for, it serves
        Kind.CPU: (Precision.CPU_INT8, Precision.INT8, Precision.BF16, Precision.FP32),
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
    cpu_share: int = 1,
) -> dict[str, Any]:
    """Write one configured model (preprocess, backbone variants, ensemble) into `repo`; returns what
    was written, by Triton model name. `cpu_share`: how many CPU backbones of the repository serve at once
    (each ensemble routes to one), among which a CPU model divides the host's cores. The spec's `tuned:`
    settings (`vitserve tune`) win over its own serving fields."""
    if spec.tuned is not None and spec.tuned.host:
        from vitserve.exporter.hostinfo import cpu_summary

        if spec.tuned.host != cpu_summary():
            log.warning(
                "model %s: its tuned settings were measured on another host (%s; this one: %s): they serve "
                "best where they were tuned; run `vitserve tune --model %s` on the serving host",
                spec.name, spec.tuned.host, cpu_summary(), spec.name,
            )  # fmt: skip
    spec = spec.serving()
    written: dict[str, Any] = {}
    pre_name = preprocess_model_name(spec.name)
    pre_dir = repo / pre_name
    write_config(pre_dir, preprocess_config(pre_name, spec, manifest))
    if spec.preprocess == "dali":
        from vitserve.exporter import dali

        recipe = spec.served_preprocess(manifest).as_dict()
        dali.write_model_file(recipe, pre_dir / "1" / "model.dali", spec.profile.max)
    else:
        copy_served_source(PREPROCESS_SOURCE, pre_dir / "1")
    written[pre_name] = {"role": "preprocess", "preprocess": spec.preprocess}
    for v in variants:
        name = backbone_model_name(spec.name, v.precision, v.kind)
        mdir = repo / name
        write_config(mdir, backbone_config(name, spec, manifest, v, cpu_share))
        if labels is not None:
            _link_or_copy(labels, mdir / LABELS_FILE)
        if v.kind is Kind.CPU:
            copy_served_source(CPU_BACKBONE_SOURCE, mdir / "1")
            for file, src in {n: f for n, f in v.served_files().values() if n != ONNX_FILE}.items():
                _link_or_copy(src, mdir / "1" / file)
            fallback = dict(v.flavours).get(contract.ONNXRUNTIME_FP32)
            data = fallback.with_name(fallback.name + ".data") if fallback is not None else None
            if data is not None and fallback != v.onnx and data.exists():
                if v.external_data is not None:  # both name model.onnx.data: keep the variant's own
                    log.warning("%s: the FP32 fallback's external data clashes with the model's", name)
                else:
                    _link_or_copy(data, mdir / "1" / data.name)
        if v.kind in (Kind.CPU, Kind.ONNXRUNTIME):
            _link_or_copy(v.onnx, mdir / "1" / ONNX_FILE)
            if v.external_data is not None:
                _link_or_copy(v.external_data, mdir / "1" / v.external_data.name)
        else:
            # the ONNX travels with the repository so build.sh can run inside the serving container
            _link_or_copy(v.onnx, mdir / "onnx" / ONNX_FILE)
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
        _link_or_copy(labels, ens_dir / LABELS_FILE)
    written[spec.name] = {"role": "ensemble", "backbone": serve_name}
    return written


def tokenizer_config(name: str, params: TextParams):
    """NAME_text_tokenize: the python model (triton_models/tokenize.py) turning `text` strings into open_clip's
    `tokens`; its `text` parameter (TextParams) is what the clients read through the model-config API."""
    mc = _pb()
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=params.max_texts)
    # No dynamic batching, as NAME_preprocess: tritonserver 2.51's python backend fails every request of a
    # gathered batch for one malformed BYTES length prefix, before model.py runs; tokenizing is cheap.
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.version_policy.latest.num_versions = 1
    cfg.input.add(name=TEXT_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=TOKENS, data_type=mc.TYPE_INT64, dims=[params.context_length])
    set_params(cfg, params)
    return cfg


def text_backbone_config(
    name: str, spec: ModelSpec, params: TextParams, dim: int, variant: Variant, cpu_share: int = 1
):
    """NAME_text_{precision}_{kind}: `tokens` -> `embeddings`, batched dynamically up to `max_texts` (a whole
    request of strings is one batch). The cpu kind runs onnx_cpu.py (as the image backbones do)."""
    mc = _pb()
    check_kind_serves(variant.kind, variant.precision)
    cfg = mc.ModelConfig(name=name)
    if variant.kind is Kind.CPU:
        cfg.backend = "python"
        set_params(
            cfg,
            CpuBackboneParams(
                cpu_threads=spec.cpu_threads or "auto",
                share=cpu_share,
                optimization="extended" if variant.precision in (Precision.FP16, Precision.INT8) else "all",
                cpu_spinning=spec.cpu_spinning,
                cpu_lanes=spec.cpu_lanes or "auto",
            ),
        )
    elif variant.kind is Kind.ONNXRUNTIME:
        cfg.platform, cfg.backend = "onnxruntime_onnx", "onnxruntime"
    else:
        raise ConfigError(f"model {spec.name}: the text tower is not served by kind {variant.kind.value} yet")
    _common(cfg, spec, gpu=variant.kind is not Kind.CPU)
    cfg.max_batch_size = params.max_texts
    cfg.input.add(name=TOKENS, data_type=mc.TYPE_INT64, dims=[params.context_length])
    cfg.output.add(name=EMBEDDINGS, data_type=mc.TYPE_FP32, dims=[dim])
    warm = cfg.model_warmup.add(name="zeros_batch1", batch_size=1)
    warm.inputs[TOKENS].zero_data = True
    warm.inputs[TOKENS].data_type = mc.TYPE_INT64
    warm.inputs[TOKENS].dims.extend([params.context_length])
    return cfg


def text_ensemble_config(name: str, spec: ModelSpec, params: TextParams, dim: int, backbone: str):
    """NAME_text: `text` strings -> NAME_text_tokenize -> `backbone` -> L2-normalised `embeddings`."""
    mc = _pb()
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=params.max_texts)
    cfg.input.add(name=TEXT_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=EMBEDDINGS, data_type=mc.TYPE_FP32, dims=[dim])
    tok = cfg.ensemble_scheduling.step.add(model_name=tokenizer_model_name(spec.name), model_version=-1)
    tok.input_map[TEXT_INPUT] = TEXT_INPUT
    tok.output_map[TOKENS] = TOKENS
    step = cfg.ensemble_scheduling.step.add(model_name=backbone, model_version=-1)
    step.input_map[TOKENS] = TOKENS
    step.output_map[EMBEDDINGS] = EMBEDDINGS
    return cfg


# The text backbone NAME_text routes to, by its first kind: the CPU default is FP32 (the same embedding for
# a string alone or in a batch; onnxruntime's dynamic int8 is not), GPUs FP16 where it is published.
TEXT_SERVING_ORDER = {
    Kind.CPU: (Precision.FP32,),
    Kind.ONNXRUNTIME: (Precision.FP32, Precision.FP16),
    Kind.TENSORRT: (Precision.FP16, Precision.FP32),
}


def write_text_models(
    repo: Path,
    spec: ModelSpec,
    manifest: dict[str, Any],
    params: TextParams,
    variants: list[Variant],
    cpu_share: int = 1,
) -> dict[str, Any]:
    """Write the text side of CLIP model `spec` (`text: true`) into `repo`: NAME_text_tokenize, the text
    backbone variants NAME_text_{precision}_{kind} and the ensemble NAME_text; returns what was written, by
    Triton model name (roles text_tokenize, text_backbone, text_ensemble)."""
    spec = spec.serving()
    text = text_model_name(spec.name)
    dim = int(manifest["feature_dim"])
    written: dict[str, Any] = {}
    tok_name = tokenizer_model_name(spec.name)
    write_config(repo / tok_name, tokenizer_config(tok_name, params))
    copy_served_source(TOKENIZER_SOURCE, repo / tok_name / "1")
    written[tok_name] = {"role": "text_tokenize", "tokenizer": params.tokenizer}
    for v in variants:
        name = backbone_model_name(text, v.precision, v.kind)
        mdir = repo / name
        write_config(mdir, text_backbone_config(name, spec, params, dim, v, cpu_share))
        if v.kind is Kind.CPU:
            copy_served_source(CPU_BACKBONE_SOURCE, mdir / "1")
        _link_or_copy(v.onnx, mdir / "1" / ONNX_FILE)
        if v.external_data is not None:
            _link_or_copy(v.external_data, mdir / "1" / v.external_data.name)
        written[name] = {"role": "text_backbone", "precision": v.precision.value, "kind": v.kind.value}
    # the first kind of the model that serves text (no TensorRT text plans yet: a GPU model's onnxruntime kind)
    serve = next(
        (
            v
            for kind in spec.kinds
            for p in TEXT_SERVING_ORDER[kind]
            for v in variants
            if v.kind is kind and v.precision is p
        ),
        None,
    )
    if serve is None:
        raise ConfigError(
            f"model {spec.name}: no text variant can be served by its kinds {[k.value for k in spec.kinds]}"
        )
    serve_name = backbone_model_name(text, serve.precision, serve.kind)
    write_config(repo / text, text_ensemble_config(text, spec, params, dim, serve_name))
    (repo / text / "1").mkdir(parents=True, exist_ok=True)
    written[text] = {"role": "text_ensemble", "backbone": serve_name, "tokenizer": tok_name}
    return written


def published_backbones(repository: str | Path, model: str) -> list[str]:
    """The backbone models of `model` that the repository at `repository` publishes (its manifest), the
    one its ensemble routes to first."""
    path = Path(repository) / REPOSITORY_MANIFEST
    if not path.is_file():
        raise ConfigError(f"{repository} has no {REPOSITORY_MANIFEST}; build it first: make engines")
    models = json.loads(path.read_text())["models"]
    if model not in models:
        raise ConfigError(f"model {model!r} is not in {path} (models: {', '.join(models)})")
    triton = models[model]["triton_models"]
    backbones = [n for n, t in triton.items() if t.get("role") == "backbone"]
    routed = triton.get(model, {}).get("backbone")
    return sorted(backbones, key=lambda n: n != routed)


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Read a built repository's manifest (used by `make perf`).")
    parser.add_argument("--published-backbones", metavar="MODEL", required=True)
    parser.add_argument("repository")
    a = parser.parse_args()
    try:
        print("\n".join(published_backbones(a.repository, a.published_backbones)))
    except ConfigError as e:
        sys.exit(f"error: {e}")
