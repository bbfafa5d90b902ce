"""The client talks to DALI ensembles, whose `image` is UINT8 [-1] raw bytes (real tritonserver).

There is no DALI backend here: `rawimg` is an ensemble with the interface `preprocess: dali` writes (input
`image` UINT8 [-1] with allow_ragged_batch, dynamic batching) over a python-backend step
(tests/data/uint8_image_model.py) that returns, for each request, the length, CRC32, first/last byte and
decoded size of the bytes it received, and how many requests its execution batched. So the tests see
exactly what reached the server: every image intact, in order, one per request, batched by the server.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitserve.client import AsyncVitClient, VitClient
from vitserve.client import images as images_mod
from vitserve.client.schema import TensorSpec, parse_model
from vitserve.errors import ClientError

ROOT = Path(__file__).resolve().parents[1]
MODEL = "rawimg"
BATCH_FAILING = "rawimg_dali"  # fails every request of a server batch for one bad image, as DALI does
MAX_BATCH = 8
LABELS = ["a", "b", "c"]


def _write_config(path: Path, cfg) -> None:
    from google.protobuf import text_format

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def _add_model(repo: Path, name: str, batch_errors: bool) -> None:
    """Ensemble `name` (what `preprocess: dali` writes) over the python step `name`_preprocess."""
    from tritonclient.grpc import model_config_pb2 as mc

    pre = repo / f"{name}_preprocess"
    (pre / "1").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "uint8_image_model.py", pre / "1" / "model.py")
    cfg = mc.ModelConfig(name=pre.name, backend="python", max_batch_size=MAX_BATCH)
    cfg.input.add(name="image", data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    cfg.output.add(name="embeddings", data_type=mc.TYPE_FP32, dims=[8])
    cfg.output.add(name="probs", data_type=mc.TYPE_FP32, dims=[3])
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.dynamic_batching.max_queue_delay_microseconds = 100_000  # long enough to gather concurrent requests
    cfg.parameters["batch_errors"].string_value = "true" if batch_errors else "false"
    _write_config(pre, cfg)

    ens = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=MAX_BATCH)
    ens.input.add(name="image", data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    ens.output.add(name="embeddings", data_type=mc.TYPE_FP32, dims=[8])
    ens.output.add(name="probs", data_type=mc.TYPE_FP32, dims=[3], label_filename="labels.txt")
    step = ens.ensemble_scheduling.step.add(model_name=pre.name, model_version=-1)
    step.input_map["image"] = "image"
    step.output_map["embeddings"] = "embeddings"
    step.output_map["probs"] = "probs"
    _write_config(repo / name, ens)
    (repo / name / "1").mkdir()
    (repo / name / "labels.txt").write_text("\n".join(LABELS) + "\n")


@pytest.fixture(scope="module")
def uint8_server(tmp_path_factory):
    from vitserve.server import TritonServer

    repo = tmp_path_factory.mktemp("uint8_repo")
    _add_model(repo, MODEL, batch_errors=False)
    _add_model(repo, BATCH_FAILING, batch_errors=True)
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("logs") / "uint8_server.log") as server:
        yield server


def _png(size: tuple[int, int], seed: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[images_mod.ORIENTATION] = orientation
        kw["exif"] = exif
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


BAD = {3, 6}  # the undecodable images of _inputs (garbage, and empty bytes: a [1, 0] tensor)


def _inputs(tmp_path: Path) -> list:
    """Images of every kind the client takes, of different lengths, with one undecodable in the middle."""
    path = tmp_path / "photo.png"
    path.write_bytes(_png((17, 11), seed=1))
    rotated = Image.open(io.BytesIO(_png((9, 5), seed=2, orientation=6)))  # EXIF orientation travels along
    return [
        path,
        _jpeg((31, 20)),
        rotated,
        b"\x89PNG\r\n\x1a\n this is not an image",
        np.random.default_rng(3).integers(0, 256, (7, 13, 3), dtype=np.uint8),
        _png((40, 3), seed=4),
        b"",
    ]


def _expected(images: list) -> np.ndarray:
    """What the model must report for each image: the row of the bytes the client is meant to send."""
    rows = []
    for i, image in enumerate(images):
        item, _ = images_mod._check(i, image)
        data = images_mod.encoded(item)
        crc = zlib.crc32(data)
        w, h = (0, 0) if i in BAD else Image.open(io.BytesIO(data)).size
        ends = (data[0], data[-1]) if data else (0, 0)
        rows.append([len(data), crc >> 16, crc & 0xFFFF, w, h, *ends])
    return np.asarray(rows, dtype=np.float64)


def _check_rows(images: list, emb: np.ndarray, errors: dict[int, str]) -> None:
    assert emb.shape == (len(images), 8)
    assert set(errors) == BAD and all("cannot decode image" in errors[i] for i in BAD), errors
    assert np.isnan(emb[sorted(BAD)]).all()
    expected = _expected(images)
    good = [i for i in range(len(images)) if i not in BAD]
    np.testing.assert_array_equal(emb[good, :7], expected[good])


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sync_client_sends_each_image_intact_in_order(uint8_server, tmp_path, protocol):
    images = _inputs(tmp_path)
    url = uint8_server.grpc_url if protocol == "grpc" else uint8_server.http_url
    with VitClient(url, model=MODEL, protocol=protocol, batch_size=4, max_in_flight=3) as client:
        assert client.model_info().inputs["image"] == TensorSpec("image", "UINT8", (-1,))
        result = client.embed(images)
        _check_rows(images, result.embeddings, result.errors)
        with pytest.raises(ClientError, match=r"image 3\b(.|\n)*image 6\b") as e:
            client.embed(images, strict=True)
        assert "cannot decode image" in str(e.value)
        top = client.classify(images, top_k=1)
        assert set(top.errors) == BAD
        lengths = _expected(images)[:, 0].astype(int)
        for i, pred in enumerate(top.predictions):
            if i not in BAD:
                assert pred == [(LABELS[lengths[i] % 3], 1.0)]


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_bounds_requests_and_the_server_batches_them(uint8_server, tmp_path, protocol):
    """Many images, at most `max_in_flight` requests at once: no execution holds more (the bound), and
    some hold several of different lengths (the server batches ragged requests), every row still intact."""
    images = [_png((5 + i, 3 + (i % 4)), seed=i) for i in range(16)]
    url = uint8_server.grpc_url if protocol == "grpc" else uint8_server.http_url

    async def run():
        async with AsyncVitClient(url, model=MODEL, protocol=protocol, max_in_flight=3) as client:
            return await client.embed(images)

    result = asyncio.run(run())
    assert result.errors == {}
    rows = result.embeddings
    for i, data in enumerate(images):
        crc = zlib.crc32(data)
        assert rows[i, :5].tolist() == [len(data), crc >> 16, crc & 0xFFFF, 5 + i, 3 + (i % 4)], i
    per_execution = rows[:, 7]
    assert per_execution.max() <= 3, per_execution
    assert per_execution.max() > 1, f"the server never batched two requests: {per_execution}"


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_bad_image_does_not_fail_the_good_ones_batched_with_it(uint8_server, protocol):
    """DALI fails every request of a server batch for one bad image: the client re-sends the refused
    images one at a time, so only the bad ones are reported and every good one gets its own row."""
    images = [_png((5 + i, 4), seed=i) for i in range(12)]
    bad = {2, 9}
    for i in bad:
        images[i] = b"GIF89a not really"
    url = uint8_server.grpc_url if protocol == "grpc" else uint8_server.http_url

    async def run():
        async with AsyncVitClient(url, model=BATCH_FAILING, protocol=protocol, max_in_flight=4) as client:
            return await client.embed(images)

    result = asyncio.run(run())
    assert set(result.errors) == bad and all("cannot decode image" in result.errors[i] for i in bad)
    for i, data in enumerate(images):
        if i not in bad:
            assert result.embeddings[i, :4].tolist() == [
                len(data),
                zlib.crc32(data) >> 16,
                zlib.crc32(data) & 0xFFFF,
                5 + i,
            ], i


@pytest.mark.triton
def test_embeddings_come_back_through_shared_memory(uint8_server, tmp_path):
    """UINT8 inputs go over the network (one request each); `embeddings` use the shared-memory slots."""
    import tritonclient.grpc as grpcclient

    def regions() -> set[str]:
        status = grpcclient.InferenceServerClient(uint8_server.grpc_url).get_system_shared_memory_status(
            as_json=True
        )
        return {name for name in status.get("regions", {}) if name.startswith("vitserve_")}

    images = _inputs(tmp_path)
    before = regions()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the network
        with VitClient(uint8_server.grpc_url, model=MODEL, shared_memory="system", max_in_flight=2) as client:
            result = client.embed(images)
            assert len(regions() - before) == 2  # one embeddings region per in-flight slot
    _check_rows(images, result.embeddings, result.errors)
    assert regions() == before


@pytest.mark.triton
def test_cli_embeds_and_classifies_with_a_uint8_model(uint8_server, tmp_path, capsys):
    from vitserve.cli import main

    paths = []
    for i, data in enumerate([_png((6, 4), seed=0), _jpeg((10, 8)), b"not an image"]):
        paths.append(tmp_path / f"{i}.{'jpg' if i else 'png'}")
        paths[-1].write_bytes(data)
    good = [str(p) for p in paths[:2]]
    out = tmp_path / "emb.npy"
    assert (
        main(
            [
                "embed",
                "--url",
                uint8_server.http_url,
                "--protocol",
                "http",
                "--model",
                MODEL,
                *good,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    emb = np.load(out)
    assert emb[:, 0].tolist() == [p.stat().st_size for p in paths[:2]]
    assert emb[:, 3:5].tolist() == [[6, 4], [10, 8]]
    capsys.readouterr()
    # a file Pillow cannot open is refused before sending, as for a BYTES model
    assert (
        main(
            [
                "classify",
                "--url",
                uint8_server.grpc_url,
                "--model",
                MODEL,
                "--top-k",
                "1",
                *good,
                str(paths[2]),
            ]
        )
        == 2
    )
    assert "2.jpg is not an image Pillow can read" in capsys.readouterr().err
    assert main(["classify", "--url", uint8_server.grpc_url, "--model", MODEL, "--top-k", "1", *good]) == 0
    printed = capsys.readouterr().out
    for p in paths[:2]:
        assert f"{p}\n  1.000000  {LABELS[p.stat().st_size % 3]}" in printed


def test_image_input_forms_are_checked_at_the_door():
    def info(datatype: str, dims: list[int], max_batch: int = 8):
        meta = {"name": "m", "inputs": [{"name": "image", "datatype": datatype, "shape": [-1, *dims]}]}
        return parse_model(meta, {"max_batch_size": max_batch})

    assert info("BYTES", [1]).check_images() == "BYTES"
    assert info("UINT8", [-1]).check_images() == "UINT8"
    for datatype, dims in (("UINT8", [3]), ("UINT8", [-1, -1]), ("BYTES", [-1]), ("FP32", [-1])):
        with pytest.raises(ClientError, match=r"BYTES \[-1, 1\] or UINT8 \[-1, -1\]"):
            info(datatype, dims).check_images()
    with pytest.raises(ClientError, match="max_batch_size 0"):
        parse_model(
            {"name": "m", "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1]}]}, {}
        ).check_images()


def test_dali_ensemble_input_is_ragged_after_a_round_trip(tmp_path):
    """The ensemble `preprocess: dali` writes takes UINT8 [-1] with allow_ragged_batch, as its DALI step
    does, read back from the config.pbtxt Triton loads."""
    from tritonclient.grpc import model_config_pb2 as mc

    from vitserve.exporter.config import Kind, ModelSpec
    from vitserve.exporter.repository import ensemble_config, preprocess_config, read_config, write_config

    spec = ModelSpec(name="m", backbone="ViT-B-32", kinds=(Kind.TENSORRT,))
    assert spec.preprocess == "dali"
    manifest = {
        "input": {"shape": [-1, 3, 224, 224]},
        "preprocess": {},
        "feature_dim": 512,
        "head": {"num_classes": 0},
        "outputs": ["embeddings"],
    }
    write_config(tmp_path / "m", ensemble_config("m", spec, manifest, "m_fp16_tensorrt"))
    write_config(tmp_path / "m_preprocess", preprocess_config("m_preprocess", spec, manifest))
    for name in ("m", "m_preprocess"):
        (inp,) = read_config(tmp_path / name / "config.pbtxt").input
        assert (inp.name, list(inp.dims), inp.allow_ragged_batch) == ("image", [-1], True)
        assert inp.data_type == mc.TYPE_UINT8
