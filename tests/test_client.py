"""The Python client against the real tritonserver serving the ViT-B-32 repository (ensemble `vitb32`).

The ensemble routes to the cpu-int8 backbone, whose dynamic quantization scales activations per batch: an
image's embedding depends (by ~1e-3) on the images it is batched with. Exact comparisons therefore send
the same 8 images as one request every time; the others compare by cosine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitserve.client import AsyncVitClient, VitClient
from vitserve.client import shm as shm_mod
from vitserve.errors import ClientError, ConfigError

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory) -> list[Path]:
    """The 8 held-out photographs as files, alternately JPEG and PNG."""
    from vitserve.exporter.samples import eval_photos

    d = tmp_path_factory.mktemp("client_photos")
    paths = []
    for i, (name, im) in enumerate(eval_photos()):
        path = d / f"{i}_{name}.{'jpg' if i % 2 else 'png'}"
        im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(vitb32_server, photo_paths) -> np.ndarray:
    """Embeddings of the 8 photos, one gRPC request, no shared memory."""
    with VitClient(vitb32_server.grpc_url, "vitb32", batch_size=8) as client:
        result = client.embed(photo_paths, strict=True)
    assert result.embeddings.shape == (8, 512) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-4)
    return result.embeddings


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def _embed(server, protocol, mode, images, **kwargs):
    if mode == "sync":
        with VitClient(_url(server, protocol), "vitb32", protocol=protocol, **kwargs) as client:
            return client.embed(images)

    async def run():
        async with AsyncVitClient(_url(server, protocol), "vitb32", protocol=protocol, **kwargs) as client:
            return await client.embed(images)

    return asyncio.run(run())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    "protocol,mode,shared_memory",
    [
        ("grpc", "async", "none"),
        ("http", "sync", "none"),
        ("http", "async", "none"),
        ("grpc", "sync", "system"),
        ("http", "async", "system"),
    ],
)
def test_embeddings_agree_across_protocols_modes_and_shared_memory(
    vitb32_server, photo_paths, reference, protocol, mode, shared_memory
):
    result = _embed(vitb32_server, protocol, mode, photo_paths, batch_size=8, shared_memory=shared_memory)
    assert not result.errors
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


def test_in_memory_images_and_bytes_are_accepted(vitb32_server, photo_paths, reference):
    from PIL import Image

    mixed = [
        photo_paths[0].read_bytes(),
        Image.open(photo_paths[1]),
        *photo_paths[2:7],
        np.asarray(Image.open(photo_paths[7]).convert("RGB")),
    ]
    result = _embed(vitb32_server, "grpc", "sync", mixed, batch_size=8)
    # PIL images and arrays travel as PNG: lossless for the PNGs, a re-encoding of the decoded JPEG's pixels
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


def test_exif_orientation_is_the_same_for_every_input_type(vitb32_server, tmp_path):
    """One photo stored rotated with EXIF orientation 6, sent as a path, bytes, a PIL image (as opened, the
    orientation in its EXIF) and an upright array: the same embedding each time. One image per request,
    sent one after the other, so each runs alone: the cpu-int8 backbone's activation scales are per call
    (dynamic quantization), and an image batched with others (or cut into another lane's slice) is
    quantized with theirs."""
    from PIL import Image, ImageOps

    from vitserve.exporter.samples import eval_photos

    photo = eval_photos()[0][1].convert("RGB")
    photo = photo.crop((0, 0, photo.width, photo.height * 2 // 3))  # a turn changes the shape too
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    opened = Image.open(path)
    assert opened.getexif()[0x0112] == 6 and opened.size == (photo.height, photo.width)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    stored = np.asarray(Image.open(path).convert("RGB"))  # the pixels as stored, not turned
    result = _embed(
        vitb32_server, "grpc", "sync", [path, path.read_bytes(), opened, upright, stored], batch_size=1
    )
    assert not result.errors
    emb = result.embeddings
    for i, kind in enumerate(["bytes", "PIL image", "upright array"], start=1):
        np.testing.assert_allclose(emb[i], emb[0], atol=1e-5, err_msg=f"{kind} vs path")
    assert np.abs(emb[4] - emb[0]).max() > 1e-3  # the turn matters: the stored pixels embed differently


def test_large_input_is_split_and_reassembled_in_order(vitb32_server, photo_paths, reference):
    images = (photo_paths * 3)[:20]
    result = _embed(vitb32_server, "grpc", "async", images, batch_size=3, max_in_flight=3)
    assert result.embeddings.shape == (20, 512) and not result.errors
    sims = result.embeddings @ reference.T
    assert (sims.argmax(axis=1) == np.arange(20) % 8).all()
    assert sims.max(axis=1).min() > 0.99


def test_batch_size_above_the_models_max_is_lowered(vitb32_server, photo_paths, reference):
    with VitClient(vitb32_server.grpc_url, batch_size=64) as client:
        result = client.embed(photo_paths)
        assert client.model_info().max_batch_size == 8
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


def _pixel_values(build, photo_paths) -> np.ndarray:
    """The photos preprocessed exactly as the server's preprocess model does."""
    from vitserve.exporter.repository import read_config
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    cfg = read_config(build["repository"] / "vitb32_preprocess" / "config.pbtxt")
    params = json.loads(cfg.parameters["preprocess"].string_value)
    return np.stack([preprocess_bytes(p.read_bytes(), params) for p in photo_paths])


@pytest.mark.parametrize("protocol,shared_memory", [("grpc", "system"), ("http", "none")])
def test_tensors_go_to_the_ensembles_backbone(
    vitb32_build, vitb32_server, photo_paths, reference, protocol, shared_memory
):
    pixels = _pixel_values(vitb32_build, photo_paths)
    with VitClient(
        _url(vitb32_server, protocol), "vitb32", protocol=protocol, shared_memory=shared_memory
    ) as client:
        result = client.embed(pixels)
        assert client.model_info(tensor=True).name == "vitb32_cpu-int8_cpu"
        one = client.embed(pixels[0])  # a single CHW tensor is a batch of one
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)
    assert one.embeddings.shape == (1, 512)


def test_named_backbone_and_wrong_tensor_size(vitb32_build, vitb32_server, photo_paths, reference):
    pixels = _pixel_values(vitb32_build, photo_paths)
    with VitClient(vitb32_server.grpc_url, backbone="vitb32_fp32_cpu") as client:
        fp32 = client.embed(pixels).embeddings
        with pytest.raises(ClientError, match=r"\(3, 224, 224\)"):
            client.embed(pixels[:, :, :112, :112])
    assert _cosines(fp32, reference).min() > 0.98  # fp32 vs the int8 variant the ensemble serves


def test_classify_returns_labels_from_the_label_file(vitb32_build, vitb32_server, photo_paths):
    labels = set((vitb32_build["repository"] / "vitb32" / "labels.txt").read_text().split())
    with VitClient(vitb32_server.grpc_url) as client:
        result = client.classify(photo_paths, top_k=3)
        everything = client.classify(photo_paths[:1], top_k=50)  # more than there are classes
    assert len(result) == 8 and not result.errors
    for top in result:
        assert len(top) == 3
        assert {label for label, _ in top} <= labels
        scores = [s for _, s in top]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert len(everything[0]) == len(labels)
    assert abs(sum(s for _, s in everything[0]) - 1.0) < 1e-3

    async def over_http():
        async with AsyncVitClient(vitb32_server.http_url, protocol="http") as client:
            return await client.classify(photo_paths, top_k=3)

    http = asyncio.run(over_http())
    assert [[label for label, _ in top] for top in http] == [[label for label, _ in top] for top in result]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_paths_are_refused_before_anything_is_sent(tmp_path, photo_paths):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    missing = tmp_path / "missing.png"
    # no server listens there: an error about the paths proves nothing was sent
    with VitClient(f"localhost:{_free_port()}", timeout_s=2) as client, pytest.raises(ClientError) as e:
        client.embed([photo_paths[0], missing, not_image])
    message = str(e.value)
    assert str(missing) in message and "does not exist" in message
    assert str(not_image) in message and "image 2" in message
    assert "cannot reach" not in message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_not_running_is_a_clear_error_not_a_hang(protocol, photo_paths):
    url = f"localhost:{_free_port()}"
    with VitClient(url, protocol=protocol, timeout_s=2, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(ClientError, match="cannot reach tritonserver") as e:
            client.embed(photo_paths[:1])
        assert url in str(e.value)
        with pytest.raises(ClientError, match="not ready within 1 s"):
            client.wait_until_ready(1.0)
        assert time.monotonic() - start < 30  # a hang check, not a timing


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_that_never_answers_times_out(protocol, photo_paths):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        with VitClient(
            f"127.0.0.1:{silent.getsockname()[1]}", protocol=protocol, timeout_s=1, retries=0
        ) as client:
            start = time.monotonic()
            with pytest.raises(ClientError, match="did not answer within 1 s"):
                client.embed(photo_paths[:1])
            assert time.monotonic() - start < 30


def test_wait_until_ready(vitb32_server):
    with VitClient(vitb32_server.grpc_url) as client:
        client.wait_until_ready(10)
    client = VitClient(vitb32_server.http_url, "nope", protocol="http")
    with client, pytest.raises(ClientError, match=r"model 'nope' is not ready.*vitb32_preprocess"):
        client.wait_until_ready(1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_model_names_the_loaded_ones(vitb32_server, photo_paths, protocol):
    client = VitClient(_url(vitb32_server, protocol), "vitb23", protocol=protocol)
    with client, pytest.raises(ClientError) as e:
        client.embed(photo_paths[:1])
    message = str(e.value)
    assert "'vitb23' is not loaded" in message
    for name in ("vitb32", "vitb32_preprocess", "vitb32_cpu-int8_cpu", "vitb32_fp32_cpu"):
        assert name in message


def test_metadata_mismatch_says_what_the_server_has(vitb32_server, photo_paths):
    with (
        VitClient(vitb32_server.grpc_url, "vitb32_fp32_cpu") as client,
        pytest.raises(ClientError, match=r"does not take encoded images.*pixel_values FP32 \[3, 224, 224\]"),
    ):
        client.embed(photo_paths[:1])
    client = VitClient(vitb32_server.grpc_url, "vitb32_preprocess")
    with client, pytest.raises(ClientError, match=r"has no output `embeddings`.*pixel_values"):
        client.embed(photo_paths[:1])


@pytest.fixture(scope="module")
def with_bad_images(photo_paths, tmp_path_factory) -> list:
    """Photos 0, 2, 4 with corrupt bytes at 1 and a truncated JPEG file (valid header) at 3."""
    truncated = tmp_path_factory.mktemp("bad") / "truncated.jpg"
    data = photo_paths[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return [photo_paths[0], b"\x89PNG\r\n\x1a\n garbage", photo_paths[2], truncated, photo_paths[4]]


@pytest.mark.parametrize("protocol,mode", [("grpc", "sync"), ("http", "async")])
def test_one_bad_image_among_many_fails_alone(vitb32_server, with_bad_images, reference, protocol, mode):
    result = _embed(vitb32_server, protocol, mode, with_bad_images, batch_size=8)
    assert set(result.errors) == {1, 3}
    assert "image" in result.errors[1] and "truncated" in result.errors[3]
    assert result.ok.tolist() == [True, False, True, False, True]
    assert np.isnan(result.embeddings[[1, 3]]).all()
    assert _cosines(result.embeddings[[0, 2, 4]], reference[[0, 2, 4]]).min() > 0.99


def test_strict_mode_raises_naming_the_index(vitb32_server, with_bad_images):
    with VitClient(vitb32_server.grpc_url) as client:
        with pytest.raises(
            ClientError, match=r"(?s)2 image\(s\) failed.*image 1 .*image 3 \(.*truncated\.jpg\)"
        ):
            client.embed(with_bad_images, strict=True)
        top = client.classify(with_bad_images, top_k=2)
    assert top[1] is None and top[3] is None and set(top.errors) == {1, 3}
    assert all(len(top[i]) == 2 for i in (0, 2, 4))


def _our_regions(server) -> set[str]:
    import tritonclient.grpc as grpcclient

    status = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(as_json=True)
    return {name for name in status.get("regions", {}) if name.startswith("vitserve_")}


def test_shared_memory_is_released_on_close_and_on_errors(vitb32_server, photo_paths, with_bad_images):
    before = _our_regions(vitb32_server)
    with (
        pytest.raises(RuntimeError),
        VitClient(vitb32_server.grpc_url, shared_memory="system", max_in_flight=2) as client,
    ):
        client.embed(with_bad_images)
        regions = _our_regions(vitb32_server) - before
        assert len(regions) == 2  # one embeddings region per in-flight slot
        raise RuntimeError("the caller fails while the regions are registered")
    assert not (_our_regions(vitb32_server) & regions)
    assert not [r for r in regions if Path("/dev/shm", r).exists()]


def test_cuda_shared_memory_falls_back_with_a_warning(vitb32_server, photo_paths, reference):
    if shm_mod.cuda_available(0) is None:
        pytest.skip("CUDA shared memory works here; the fallback is not exercised")
    with pytest.warns(RuntimeWarning, match="system shared memory instead"):
        result = _embed(vitb32_server, "grpc", "sync", photo_paths, shared_memory="cuda")
    np.testing.assert_allclose(result.embeddings, reference, atol=1e-5)


def test_shared_memory_only_for_a_local_server():
    assert (
        shm_mod.is_local("localhost:8001")
        and shm_mod.is_local("127.0.0.1:8000")
        and shm_mod.is_local("[::1]:8001")
    )
    assert not shm_mod.is_local("triton.example.invalid:8001")


def test_bad_settings_are_refused():
    for kwargs, match in [
        ({"protocol": "ftp"}, "protocol: 'ftp'"),
        ({"batch_size": 0}, "batch_size 0"),
        ({"shared_memory": "gpu"}, "shared_memory: 'gpu'"),
        ({"timeout_s": 0}, "timeout_s 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            VitClient("localhost:8001", **kwargs)
    with pytest.raises(ClientError, match="top_k 0"), VitClient("localhost:8001") as client:
        client.classify([b"x"], top_k=0)


def test_cli_classify_and_embed(vitb32_server, photo_paths, reference, with_bad_images, tmp_path, capsys):
    from vitserve.cli import main

    paths = [str(p) for p in photo_paths[:2]]
    assert main(["classify", "--url", vitb32_server.grpc_url, "--top-k", "2", *paths]) == 0
    out = capsys.readouterr().out
    assert out.count(paths[0]) == 1 and len(out.strip().splitlines()) == 2 * 3
    out_file = tmp_path / "emb.npy"
    argv = [
        "embed",
        "--url",
        vitb32_server.http_url,
        "--protocol",
        "http",
        *map(str, photo_paths),
        "--out",
        str(out_file),
    ]
    assert main(argv) == 0
    np.testing.assert_allclose(np.load(out_file), reference, atol=1e-5)
    bad = str(with_bad_images[3])
    assert main(["classify", "--url", vitb32_server.grpc_url, paths[0], bad]) == 1
    assert f"{bad}: error:" in capsys.readouterr().err
    assert (
        main(["embed", "--url", vitb32_server.grpc_url, str(tmp_path / "none.jpg"), "--out", str(out_file)])
        == 2
    )


def test_client_imports_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import vitserve.client, vitserve.client.cli\n"
        "from vitserve.client import VitClient\n"
        "from vitserve.errors import ClientError\n"
        "with VitClient('localhost:1', timeout_s=1, retries=0) as c:\n"
        "    try:\n"
        "        c.wait_until_ready(0.2)\n"
        "    except ClientError:\n"
        "        pass\n"
        "assert 'vitserve.exporter' not in sys.modules, 'the client imported the exporter'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_restricted_and_dali_answers_are_classed_by_what_they_mean():
    """tritonserver refuses a restricted API over gRPC with UNAVAILABLE ("This protocol is restricted"): not
    a server to wait for. dali_backend fails a bad image with UNKNOWN (gRPC) / 400 (HTTP): an input error
    for a DALI ensemble only; INTERNAL stays a server failure everywhere."""
    from tritonclient.utils import InferenceServerException as E

    from vitserve.client.transport import FORBIDDEN, INPUT, OTHER, RETRY, error_kind

    restricted = "This protocol is restricted, expecting header 'triton-grpc-protocol-vitserve-api-key'"
    assert error_kind(E(restricted, status="StatusCode.UNAVAILABLE")) == FORBIDDEN
    assert (
        error_kind(E("This API is restricted, expecting header 'vitserve-api-key'", status="403"))
        == FORBIDDEN
    )
    assert error_kind(E("Server not ready", status="StatusCode.UNAVAILABLE")) == RETRY
    dali_error = E("Runtime error: Critical error in pipeline: ...", status="StatusCode.UNKNOWN")
    assert error_kind(dali_error, dali=True) == INPUT
    assert error_kind(dali_error) == OTHER
    assert error_kind(E("Stub process is not healthy.", status="StatusCode.INTERNAL"), dali=True) == OTHER


@pytest.fixture(scope="module")
def keyed_uint8_server(tmp_path_factory):
    """The DALI-shaped stand-in ensembles of test_client_uint8 behind a key (control APIs restricted)."""
    from test_client_uint8 import BATCH_FAILING, MODEL, _add_model

    from vitserve.apikey import CONTROL_APIS
    from vitserve.server import TritonServer

    repo = tmp_path_factory.mktemp("keyed_uint8_repo")
    _add_model(repo, MODEL, batch_errors=False)
    _add_model(repo, BATCH_FAILING, batch_errors=True)
    log = tmp_path_factory.mktemp("logs") / "keyed_uint8_server.log"
    with TritonServer(repo, log_path=log, restricted=CONTROL_APIS, api_key="client-test-key") as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_sends_the_key_for_shared_memory_and_says_which_when_it_has_none(
    keyed_uint8_server, protocol, tmp_path
):
    import warnings

    from test_client_uint8 import MODEL, _check_rows, _inputs

    images = _inputs(tmp_path)
    url = _url(keyed_uint8_server, protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # shared memory registered: no fallback
        with VitClient(url, MODEL, protocol=protocol, shared_memory="system", api_key="client-test-key") as c:
            result = c.embed(images)
    _check_rows(images, result.embeddings, result.errors)
    with (
        pytest.warns(RuntimeWarning, match=r"restricted[\s\S]*VITSERVE_API_KEY"),
        VitClient(url, MODEL, protocol=protocol, shared_memory="system", api_key="") as c,
    ):
        result = c.embed(images)  # over the network instead
    _check_rows(images, result.embeddings, result.errors)


def test_a_dali_ensemble_failing_every_image_is_answered_with_bounded_retries(keyed_uint8_server):
    """Every image refused (as a broken DALI model would do): over gRPC each is reported, after at most
    two requests per image (its own, and the one-at-a-time re-send), and nothing else ran."""
    import tritonclient.grpc as grpcclient
    from test_client_uint8 import BATCH_FAILING

    bad = [b"\x89PNG\r\n\x1a\n not an image %d" % i for i in range(5)]
    with VitClient(
        keyed_uint8_server.grpc_url, BATCH_FAILING, max_in_flight=5, api_key="client-test-key"
    ) as c:
        result = c.embed(bad)
    assert sorted(result.errors) == list(range(5)) and "Critical error in pipeline" in result.errors[0]
    assert np.isnan(result.embeddings).all()
    # requests the DALI-shaped step ran (its error responses count as its successes; the ensemble counts
    # each failed request twice)
    stats = grpcclient.InferenceServerClient(keyed_uint8_server.grpc_url).get_inference_statistics(
        f"{BATCH_FAILING}_preprocess", headers=keyed_uint8_server.control_headers(grpc=True), as_json=True
    )
    ran = int(stats["model_stats"][0]["inference_stats"]["success"]["count"])
    assert len(bad) <= ran <= 2 * len(bad)
