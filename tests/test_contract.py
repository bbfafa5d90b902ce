"""The served-model contract (exporter/triton_models/contract.py): one owner for every name and parameter that
crosses from the build to a served model; served models validate their parameters when they load; served
sources are copies; models.yaml is checked whole before any work starts."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from vitserve import contract as C
from vitserve.errors import ConfigError
from vitserve.exporter.backbones import get_backbone
from vitserve.exporter.config import ModelSpec, load_models

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("exporter", "client", "perf", "vitserve") for p in (ROOT / d).rglob("*.py")]


def _manifest(backbone: str = "ViT-B-32") -> dict:
    e = get_backbone(backbone)
    return {
        "input": {"shape": [-1, 3, e.image_size, e.image_size]},
        "preprocess": e.preprocess.as_dict(),
        "feature_dim": e.feature_dim,
        "head": {"num_classes": 0},
        "outputs": [C.EMBEDDINGS],
    }


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "literal",
    [C.PIXELS, C.CPU_BACKBONE_PARAM, C.TUNED_PARAM, "intra_op_threads", "allow_spinning", "max_pixels"],
)
def test_each_contract_name_is_written_once(literal):
    """The tensor name, the parameter keys and the retired knob names appear as a string literal only in
    the contract (docstrings and comments aside): every other module imports them."""
    quoted = re.compile(rf"""(?<![\w.])["']{re.escape(literal)}["']""")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in SOURCES
        if p.name != "contract.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if quoted.search(line.split("#", 1)[0])
    ]
    assert not found, f"{literal!r} written outside the contract: {found}"


def test_backbone_model_names_round_trip():
    for p in C.Precision:
        for k in C.Kind:
            name = C.backbone_model_name("my_model-2", p, k)
            assert C.parse_backbone_model_name(name) == ("my_model-2", p, k)
    for other in ("vitb32", "vitb32_preprocess", "vitb32_fp32", "vitb32_int4_cpu", "vitb32_cat_head"):
        assert C.parse_backbone_model_name(other) is None


# ------------------------------------------------------------------------------------ parameters


def test_parameters_round_trip_through_json():
    pre = C.PreprocessParams(
        **get_backbone("DINOv2-S").preprocess.as_dict(), preprocess="fast", preprocess_threads=3
    )
    assert C.PreprocessParams.from_json(pre.to_json()) == pre
    assert pre.recipe == get_backbone("DINOv2-S").preprocess
    cpu = C.CpuBackboneParams(
        cpu_threads=2,
        cpu_spinning=False,
        cpu_lanes=1,
        flavours={"avx2": "a.onnx"},
        probe="p.npz",
        probe_min_cosine=0.9999,
    )
    assert C.CpuBackboneParams.from_json(cpu.to_json()) == cpu


@pytest.mark.parametrize(
    ("cls", "data", "needle"),
    [
        (C.CpuBackboneParams, {"intra_op_threads": 2}, r"unknown key\(s\) \['intra_op_threads'\]"),
        (C.CpuBackboneParams, {"cpu_threads": 0}, r"cpu_threads=0: expected 'auto' or an integer >= 1"),
        (C.CpuBackboneParams, {"cpu_spinning": "yes"}, r"cpu_spinning='yes': expected true or false"),
        (C.CpuBackboneParams, {"cpu_lanes": "2"}, r"cpu_lanes='2'"),
        (C.CpuBackboneParams, {"optimization": "max"}, r"optimization='max'"),
        (C.CpuBackboneParams, {"flavours": {"avx2": "m.onnx"}}, r"probe=None"),
        (C.CpuBackboneParams, {"flavours": {"sse": "m.onnx"}, "probe": "p.npz"}, r"flavours="),
        (C.PreprocessParams, {"size": 224}, r"resize_size"),
        (
            C.PreprocessParams,
            {"size": 224, "resize_size": 224, "threads": 2},
            r"unknown key\(s\) \['threads'\]",
        ),
        (C.PreprocessParams, {"size": 224, "resize_size": 224, "mean": [0.5, 0.5]}, r"mean=\[0.5, 0.5\]"),
        (C.PreprocessParams, {"size": 224, "resize_size": 224, "preprocess": "dali"}, r"preprocess='dali'"),
        (
            C.PreprocessParams,
            {"size": 224, "resize_size": 224, "max_image_pixels": -1},
            r"max_image_pixels=-1",
        ),
    ],
)
def test_a_malformed_parameter_is_refused_naming_its_key(cls, data, needle):
    with pytest.raises(C.ContractError, match=needle):
        cls.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("module", "params", "needle"),
    [
        (
            "onnx_cpu",
            {"cpu_threads": 1, "lanes": 2},
            r"model m_fp32_cpu parameter 'onnx_cpu': unknown key\(s\) \['lanes'\]",
        ),
        ("preprocess", {"size": 224, "resize_size": 224, "threads": 2}, r"unknown key\(s\) \['threads'\]"),
    ],
)
def test_served_models_validate_their_parameters_when_they_load(module, params, needle):
    """The served model code itself (not only the writer) refuses a malformed parameter, before any work."""
    import importlib

    mod = importlib.import_module(f"vitserve.exporter.triton_models.{module}")
    key = C.CPU_BACKBONE_PARAM if module == "onnx_cpu" else C.PREPROCESS_PARAM
    config = {"name": "m_fp32_cpu", "parameters": {key: {"string_value": json.dumps(params)}}}
    args = {"model_config": json.dumps(config), "model_repository": "/nonexistent", "model_version": "1"}
    with pytest.raises(C.ContractError, match=needle):
        mod.TritonPythonModel().initialize(args)


# ------------------------------------------------------------------------------- served files


def test_served_sources_are_copies_that_import_the_contract_beside_them(tmp_path):
    """Editing a served model.py (or its contract.py) leaves the package untouched."""
    from vitserve.exporter.repository import TRITON_MODELS, copy_served_source

    for source in (C.PREPROCESS_SOURCE, C.CPU_BACKBONE_SOURCE):
        version = tmp_path / source / "1"
        copy_served_source(source, version)
        before = (TRITON_MODELS / source).read_bytes(), Path(C.__file__).read_bytes()
        for f in ("model.py", C.SERVED_CONTRACT):
            assert (version / f).stat().st_nlink == 1
            (version / f).write_text("# edited by an operator\n")
        assert (
            (TRITON_MODELS / source).read_bytes(),
            Path(C.__file__).read_bytes(),
        ) == before


@pytest.mark.triton
def test_served_models_load_their_contract_and_refuse_a_bad_parameter_in_tritonserver(tmp_path):
    """Through the real tritonserver: a preprocess model written by the repository loads with its copied
    contract.py; the same model with a misspelt parameter key fails to load, the log naming the key."""
    from vitserve.exporter.repository import copy_served_source, preprocess_config, write_config
    from vitserve.server import TritonServer

    spec = ModelSpec(name="m", backbone="ViT-B-32")
    repo = tmp_path / "repo"
    for name, edit in (("good_preprocess", None), ("bad_preprocess", "preprocess_thread")):
        cfg = preprocess_config(name, spec, _manifest())
        if edit:
            params = json.loads(cfg.parameters[C.PREPROCESS_PARAM].string_value)
            params[edit] = params.pop("preprocess_threads")
            cfg.parameters[C.PREPROCESS_PARAM].string_value = json.dumps(params)
        write_config(repo / name, cfg)
        copy_served_source(C.PREPROCESS_SOURCE, repo / name / "1")
    log = tmp_path / "server.log"
    with TritonServer(
        repo, log_path=log, extra_args=["--exit-on-error=false", "--strict-readiness=false"]
    ) as s:
        ready = {}
        for name in ("good_preprocess", "bad_preprocess"):
            try:
                with urllib.request.urlopen(f"http://{s.http_url}/v2/models/{name}/ready", timeout=10) as r:
                    ready[name] = r.status == 200
            except urllib.error.HTTPError:
                ready[name] = False
    assert ready == {"good_preprocess": True, "bad_preprocess": False}
    text = log.read_text()
    assert "unknown key(s) ['preprocess_thread']" in text, text[-3000:]


# ------------------------------------------------------------------------------- models.yaml


def _model(name: str = "a", **kw) -> dict:
    return {"name": name, "backbone": "ViT-B-32", "weights": "random"} | kw


def _write(tmp_path: Path, *models: dict) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": list(models)}))
    return path


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"precisions": ["fp32"], "cpu_precisions": ["fp32", "cpu-int8"]},
            r"model b: cpu_precisions \['cpu-int8'\] are not built",
        ),
        ({"precisions": ["fp32", "cpu-int8"], "cpu_precisions": []}, r"model b: cpu_precisions is empty"),
        ({"backbone": "ViT-B-33"}, r"model b backbone: unknown backbone 'ViT-B-33'"),
        ({"weights": "missing.pt"}, r"model b weights: checkpoint .*missing.pt does not exist"),
        ({"head": "linear:nohead.pt"}, r"model b head: head weights .*nohead.pt do not exist"),
        (
            {"head": "zeroshot", "labels": "nolabels.txt"},
            r"model b head labels: file .*nolabels.txt does not exist",
        ),
        (
            {"backbone": "DINOv2-S", "head": "zeroshot", "labels": ["a", "b"]},
            r"model b head: a zeroshot head needs a CLIP text tower",
        ),
        (
            {"calibration": {"images": "nophotos"}},
            r"model b calibration.images: folder .*nophotos does not exist",
        ),
        (
            {"kinds": ["tensorrt"], "preprocess": "dali", "exif_transpose": False},
            r"model b: exif_transpose: false is not honoured by preprocess 'dali'",
        ),
        (
            {"kinds": ["tensorrt"], "preprocess": "dali", "scale_16bit": False},
            r"model b: scale_16bit: false is not honoured by preprocess 'dali'",
        ),
        ({"precisions": ["fp16"]}, r"model b: precisions must include 'fp32'"),
    ],
)
def test_an_error_in_the_last_model_fails_at_once_naming_model_and_field(tmp_path, fields, needle):
    """Each rule across fields, and each file a model needs, is checked when models.yaml is read: before
    any export, in well under a second (no torch), with the model and the field named."""
    path = _write(tmp_path, _model("a"), _model("b", **fields))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=needle):
        load_models(path)
    assert time.perf_counter() - t0 < 1.0


def test_every_models_errors_are_reported_together(tmp_path):
    path = _write(
        tmp_path,
        _model("a", backbone="nope"),
        _model("b", precisions=["fp32"], cpu_precisions=["int8"]),
        _model("b"),
        _model("c", heads={"x": "linear:x.pt"}),
        _model("c_x"),
    )
    with pytest.raises(ConfigError) as e:
        load_models(path)
    msg = str(e.value)
    for needle in (
        "model a backbone",
        "model b: cpu_precisions ['int8']",
        "duplicate model names ['b']",
        "model c heads.x",
    ):
        assert needle in msg, msg


def test_cpu_precisions_default_to_what_is_built(tmp_path):
    """By default the CPU kind serves what gives an image the same embedding in any batch (fp32, int8 on
    OpenVINO, bf16); dynamic cpu-int8 and fp16 only where cpu_precisions lists them (issue 26)."""
    every = ["fp32", "fp16", "bf16", "int8", "cpu-int8"]
    (a, b, c) = load_models(
        _write(
            tmp_path,
            _model("a"),
            _model("b", precisions=every),
            _model("c", precisions=every, cpu_precisions=["fp32", "cpu-int8"]),
        )
    )
    assert [p.value for p in a.cpu_precisions] == ["fp32"]
    assert [p.value for p in b.cpu_precisions] == ["fp32", "int8", "bf16"]
    assert [p.value for p in c.cpu_precisions] == ["fp32", "cpu-int8"]


def test_the_served_recipe_follows_the_weights_and_the_spec():
    """`served_preprocess` is the manifest's recipe (what the weights imply) with the spec's two switches."""
    manifest = _manifest()
    manifest["preprocess"] = manifest["preprocess"] | {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    recipe = ModelSpec(name="m", backbone="ViT-B-32", exif_transpose=False).served_preprocess(manifest)
    assert recipe.mean == (0.5, 0.5, 0.5) and recipe.exif_transpose is False and recipe.scale_16bit is True
    bad = manifest | {"preprocess": manifest["preprocess"] | {"interpolation": "area"}}
    with pytest.raises(ConfigError, match=r"model m export manifest preprocess: interpolation='area'"):
        ModelSpec(name="m", backbone="ViT-B-32").served_preprocess(bad)


def test_the_shipped_model_files_validate(tmp_path):
    for f in ("models.yaml", "models.gpu.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
        assert load_models(tmp_path / f)


def test_a_bad_pretrained_tag_in_the_last_model_fails_before_the_first_export(tmp_path):
    """`build_all` checks every named tag before it exports anything (no artifact is written)."""
    from vitserve.exporter.pipeline import build_all

    path = _write(
        tmp_path, _model("a", weights="pretrained"), _model("b", weights="pretrained:laion400m_e99")
    )
    with pytest.raises(
        ConfigError, match=r"model b weights: pretrained tag 'laion400m_e99' is not a tag of ViT-B-32"
    ):
        build_all(path, tmp_path / "repo", tmp_path / "artifacts")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "repo").exists()


def test_dali_reads_16_bit_images_as_scale_16bit_does():
    """Why `scale_16bit: false` is refused with DALI and `true` is served: DALI's decoder scales a 16-bit
    PNG to 8 bits exactly as the python model's `scale_16bit` (Pillow alone would clip it at 255)."""
    import io

    import numpy as np
    from PIL import Image

    dali = pytest.importorskip("nvidia.dali", reason="DALI is the dali extra")
    from nvidia.dali import fn, types

    from vitserve.exporter.triton_models.preprocess import decode, scale_to_8bit

    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)).save(buf, "PNG")
    data = np.frombuffer(buf.getvalue(), np.uint8)

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8))

    p = pipe()
    p.build()
    got = np.array(p.run()[0][0]).astype(int)
    im = decode(buf.getvalue(), 10**8)
    assert im.mode == "I;16"
    assert np.abs(got - np.asarray(scale_to_8bit(im).convert("RGB"))).max() == 0
    assert np.abs(got - np.asarray(im.convert("RGB"))).max() > 100  # what `scale_16bit: false` would serve
