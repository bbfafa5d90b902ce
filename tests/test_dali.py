"""The DALI preprocessing model (exporter/dali.py): parity of its graph with the backbones' reference
transforms, the written Triton model, and what DALI does with bad input.

The pipeline served on GPU hosts decodes with nvJPEG and resizes on the GPU; here the same graph runs with
DALI's CPU operators (`device_id=None`). GPU numerics are checked by the `gpu` test (`make gpu-check`).
Skipped, with the reason, where DALI is not installed (it is in `.[all]`: the `dali` extra).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip(
    "nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e '.[dali]': nvidia-dali-cuda120)"
)

from vitserve.exporter import dali
from vitserve.exporter.backbones import get_backbone

BACKBONES = ["ViT-B-32", "EVA02-L-14-336", "DINOv2-L"]  # 224 / 336 / 518 px; openai / imagenet mean-std


@pytest.mark.parametrize("backbone", BACKBONES)
def test_dali_cpu_pipeline_matches_the_reference_transform(backbone):
    """Every image (bundled photos as JPEG and PNG, portrait crops) within cosine 0.9999 of open_clip's /
    timm's own transform object (exact output size and half-to-even crop offsets computed in the graph;
    without them the worst image was at 0.9728)."""
    r = dali.parity(backbone)
    assert r["shape_ok"] and r["images"] == 24
    assert r["cosine_min"] >= dali.PARITY_MIN_COSINE, r


def test_crop_offset_rounds_half_to_even_like_python():
    """The in-graph center offset: Python's round(d / 2) for every even and odd size difference."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    d = np.arange(0, 64, dtype=np.int64)

    @pipeline_def(batch_size=len(d), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(name="d", dtype=types.INT64)
        return dali._half_to_even_center(x)

    p = pipe()
    p.build()
    p.feed_input("d", [np.array(v) for v in d])
    (out,) = p.run()
    assert [int(np.asarray(out[i])) for i in range(len(d))] == [round(v / 2) for v in d]


def test_dali_model_written_for_tritons_dali_backend(tmp_path):
    """With a GPU first kind the default is `preprocess: dali`: NAME_preprocess is a DALI model (UINT8 [-1]
    ragged input, dynamic batching, model.dali with the nvJPEG decoder) and the ensemble takes UINT8."""
    from vitserve.exporter.config import Kind, ModelSpec
    from vitserve.exporter.repository import ensemble_config, preprocess_config, read_config, write_config

    spec = ModelSpec(name="m", backbone="ViT-B-32", kinds=(Kind.TENSORRT,))
    assert spec.preprocess == "dali"
    manifest = _manifest("ViT-B-32")
    write_config(tmp_path / "m_preprocess", preprocess_config("m_preprocess", spec, manifest))
    cfg = read_config(tmp_path / "m_preprocess" / "config.pbtxt")
    assert cfg.backend == "dali" and cfg.max_batch_size == spec.profile.max
    assert cfg.dynamic_batching.max_queue_delay_microseconds == spec.dynamic_batching.max_queue_delay_us
    (inp,) = cfg.input
    assert (inp.name, list(inp.dims), inp.allow_ragged_batch) == ("image", [-1], True)
    assert list(cfg.output[0].dims) == [3, 224, 224]
    ens = ensemble_config("m", spec, manifest, "m_fp16_tensorrt")
    assert ens.input[0].data_type == inp.data_type and list(ens.input[0].dims) == [-1]
    path = dali.write_model_file(manifest["preprocess"], tmp_path / "m_preprocess" / "1" / "model.dali", 16)
    data = path.read_bytes()
    assert b"mixed" in data and b"image" in data  # nvJPEG decode; the input Triton feeds


def test_serialized_pipeline_runs_after_deserialization(tmp_path):
    """`serialize` -> `deserialize` -> run (CPU operators) gives what the pipeline object gives: the file
    Triton loads is the graph tested above."""
    from nvidia.dali import Pipeline

    pre = get_backbone("ViT-B-32").preprocess.as_dict()
    images = [d for _, d in dali.parity_images()[:4]]
    expected = dali.run_cpu(pre, images)
    path = tmp_path / "cpu.dali"
    dali.build_pipeline(pre, len(images), gpu=False).serialize(filename=str(path))
    pipe = Pipeline.deserialize(filename=str(path), device_id=None)
    pipe.build()
    pipe.feed_input(dali.INPUT, [np.frombuffer(b, dtype=np.uint8) for b in images])
    (out,) = pipe.run()
    np.testing.assert_array_equal(np.stack([np.asarray(out[i]) for i in range(len(images))]), expected)


def test_a_bad_image_fails_the_whole_dali_batch():
    """DALI has no per-sample error: a truncated JPEG (or a GIF, which it does not decode) fails the whole
    batch it is in. Pinned here because README says so; the python models fail only the bad request."""
    pre = get_backbone("ViT-B-32").preprocess.as_dict()
    good = dali.parity_images()[0][1]
    with pytest.raises(RuntimeError, match=r"decoders\.image"):
        dali.run_cpu(pre, [good, good[: len(good) // 2]])


def test_missing_dali_is_a_config_error_with_the_install_hint(monkeypatch):
    import sys

    from vitserve.errors import ConfigError

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match=r"nvidia-dali-cuda120.*preprocess: pillow"):
        dali.build_pipeline(get_backbone("ViT-B-32").preprocess.as_dict(), 1, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", BACKBONES)
def test_dali_gpu_pipeline_matches_the_reference_transform(backbone):
    """On a GPU host: nvJPEG decode + GPU resize, the operators the served model runs, within cosine
    0.9999 of the reference transform (also `make gpu-check`, which needs no TensorRT)."""
    r = dali.parity(backbone, gpu=True)
    assert r["shape_ok"] and r["cosine_min"] >= dali.PARITY_MIN_COSINE, r


def _manifest(backbone: str) -> dict:
    entry = get_backbone(backbone)
    s = entry.preprocess.size
    return {
        "input": {"shape": [-1, 3, s, s]},
        "preprocess": entry.preprocess.as_dict(),
        "feature_dim": entry.feature_dim,
        "head": {"num_classes": 0},
        "outputs": ["embeddings"],
    }


def test_check_command_prints_the_parity_and_exits_0(capsys):
    """`python -m vitserve.exporter.dali check` (README; `--gpu` on a GPU host)."""
    assert dali.main(["check", "--backbones", "ViT-B-32"]) == 0
    assert capsys.readouterr().out.startswith("PASS ViT-B-32")
