"""The client's text side through the real tritonserver (clip_text_server: ViT-B-32 random init, zero-shot head
over LABELS, `text: true`): embed_text sync/async over gRPC and HTTP, request-time labels equal to the exported
zero-shot head, the label cache, bad strings refused before sending, and the CLI's `embed --text` and
`classify --labels`."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from conftest import LABELS

from vitserve.contract import EMBEDDINGS, IMAGE_INPUT, LOGITS, ZEROSHOT_TEMPLATES
from vitserve.errors import ClientError

pytestmark = pytest.mark.triton

NAME = "clip"  # conftest.CLIP_TEXT_MODEL
SENTENCES = ["a photo of a cat.", "an astronaut on the moon", "東京の夜景", "🚀 launch"]
PARITY = 0.99999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """The held-out photographs as PNG bytes."""
    from vitserve.exporter.samples import eval_photos

    out = []
    for _, im in eval_photos():
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _ensemble_outputs(server, images: list[bytes]) -> dict[str, np.ndarray]:
    """The image ensemble's own embeddings and logits (the exported zero-shot head), straight from Triton."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        out = {EMBEDDINGS: [], LOGITS: []}
        for i in range(0, len(images), 4):
            chunk = np.array([[b] for b in images[i : i + 4]], dtype=object)
            inp = grpcclient.InferInput(IMAGE_INPUT, list(chunk.shape), "BYTES")
            inp.set_data_from_numpy(chunk)
            outputs = [grpcclient.InferRequestedOutput(n) for n in out]
            result = client.infer(NAME, [inp], outputs=outputs)
            for n in out:
                out[n].append(result.as_numpy(n))
        return {n: np.concatenate(v) for n, v in out.items()}
    finally:
        client.close()


def test_request_time_labels_equal_the_exported_zeroshot_head(clip_text_server, photos):
    """classify(images, labels=LABELS): the text side's label classifier (mean over the served templates of
    the normalised prompts, renormalised) times logit_scale gives the logits of the head exported over the
    same labels: same top-1, logits cosine >= 0.99999 for every image. (Four photos: the 80 prompts through
    the text tower are most of this test's time.)"""
    from vitserve.client import VitClient

    photos = photos[:4]
    served = _ensemble_outputs(clip_text_server, photos)
    with VitClient(clip_text_server.grpc_url, NAME, batch_size=16) as client:
        params = client.text_params()
        assert params.templates == ZEROSHOT_TEMPLATES
        result = client.classify(photos, labels=LABELS, top_k=3)
    assert not result.errors
    assert result.logits.shape == served[LOGITS].shape == (len(photos), len(LABELS))
    cos = _cosines(result.logits, served[LOGITS])
    print(f"request-time labels vs exported zero-shot head: logits cosine min {cos.min():.9f}")
    assert cos.min() >= PARITY, cos
    np.testing.assert_array_equal(result.logits.argmax(1), served[LOGITS].argmax(1))
    for top, row in zip(result.predictions, served[LOGITS], strict=True):
        assert top[0][0] == LABELS[int(row.argmax())] and len(top) == 3
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_embed_text_is_the_same_sync_async_grpc_http(clip_text_server):
    """embed_text over gRPC (sync) and HTTP (async) gives the same unit vectors, in order, of the image
    embeddings' size; a label set's classifier is cached (the same array the second time)."""
    from vitserve.client import AsyncVitClient, VitClient

    with VitClient(clip_text_server.grpc_url, NAME, batch_size=3) as client:
        grpc = client.embed_text(SENTENCES)
        single = client.embed_text(SENTENCES[1])
        first = client.label_embeddings(["cat", "dog"])
        assert client.label_embeddings(["cat", "dog"]) is first  # cached: no second request
        tokens = client.text_tokens(SENTENCES[:2])

    async def over_http():
        async with AsyncVitClient(clip_text_server.http_url, NAME, protocol="http") as client:
            return await client.embed_text(SENTENCES)

    http = asyncio.run(over_http())
    assert not grpc.errors and not http.errors
    assert grpc.shape == (len(SENTENCES), 512)
    np.testing.assert_allclose(np.linalg.norm(grpc.embeddings, axis=1), 1.0, atol=1e-5)
    assert _cosines(grpc.embeddings, http.embeddings).min() >= PARITY
    assert _cosines(single.embeddings, grpc.embeddings[1:2]).min() >= PARITY
    assert first.shape == (2, 512)
    assert tokens.shape == (2, 77) and tokens.dtype == np.int64 and (tokens[:, 0] > 0).all()


def test_bad_strings_are_refused_before_sending(clip_text_server):
    """Empty, too long (the served max_text_bytes), not a string, lone surrogate: ClientError naming every
    bad index before any request; labels that repeat or are empty are refused."""
    from vitserve.client import VitClient

    with VitClient(clip_text_server.grpc_url, NAME) as client:
        limit = client.text_params().max_text_bytes
        with pytest.raises(ClientError) as e:
            client.embed_text(["fine", "", "x" * (limit + 1), 3, "\ud800"])
        msg = str(e.value)
        assert "4 text(s) refused" in msg
        for part in ("text 1: empty", f"text 2: {limit + 1} bytes", "text 3: int", "text 4: not encodable"):
            assert part in msg, msg
        with pytest.raises(ClientError, match="repeat"):
            client.classify([b"x"], labels=["cat", "cat"])
        with pytest.raises(ClientError, match="labels= or head="):
            client.classify([b"x"], labels=["cat"], head="h")
    with VitClient(clip_text_server.grpc_url, "no_such_model") as client, pytest.raises(ClientError) as e:
        client.embed_text("a cat")
    assert "serves no text side" in str(e.value)


def test_cli_embed_text_and_classify_labels(clip_text_server, photos, tmp_path, capsys):
    """`vitserve embed --text` writes the client's text embeddings; `vitserve classify --labels` prints the
    request-time labels' top-k; images and --text together are refused."""
    from vitserve.cli import main
    from vitserve.client import VitClient

    out = tmp_path / "text.npy"
    url = clip_text_server.grpc_url
    argv = ["embed", "--url", url, "--model", NAME, "--out", str(out)]
    assert main([*argv, "--text", SENTENCES[0], "--text", SENTENCES[1]]) == 0
    img = tmp_path / "photo.png"
    img.write_bytes(photos[0])
    assert main([*argv, "--text", "a", str(img)]) == 2
    assert (
        main(["classify", "--url", url, "--model", NAME, "--labels", "cat,dog", "--top-k", "2", str(img)])
        == 0
    )
    printed = capsys.readouterr()
    with VitClient(url, NAME) as client:
        want = client.embed_text(SENTENCES[:2]).embeddings
        top = client.classify([str(img)], labels=["cat", "dog"], top_k=2)[0]
    assert _cosines(np.load(out), want).min() >= PARITY
    assert "one kind per run" in printed.err
    assert f"{top[0][1]:.6f}  {top[0][0]}" in printed.out


def test_readme_search_example_runs(clip_text_server, photos, tmp_path, capsys):
    """README "Text and search": the five-line search of a folder of photos by a sentence runs as written
    (server URL, model and folder substituted) and prints the five best photos, best first."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("**Search a folder of photos by a sentence**", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", after).group(1)
    code = "\n".join(line[4:] for line in block.splitlines())
    assert code.count("\n") + 1 == 7 and "embed_text" in code  # two imports + five lines
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    for i, raw in enumerate(photos):
        Image.open(io.BytesIO(raw)).convert("RGB").save(folder / f"photo{i}.jpg")
    code = code.replace('"localhost:8001"', repr(clip_text_server.grpc_url)).replace('"vitb32"', repr(NAME))
    code = code.replace('Path("photos")', f"Path({str(folder)!r})")
    exec(compile(code, "README search example", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(line.split(maxsplit=1)[1]).parent == folder for line in lines)
