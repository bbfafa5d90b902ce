"""`vitserve api` (the OpenAI-compatible embeddings endpoint) in a uvicorn subprocess on 127.0.0.1, in front of the
real tritonserver (clip_text_server): the official `openai` client and LangChain's OpenAIEmbeddings get the
Triton client's embeddings for text and data-URL images; bad input answers 400 in OpenAI's error shape; the
bearer key; concurrent requests reach Triton together (its dynamic batching combines them); 503 without
Triton."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from vitserve.api import running as api_process
from vitserve.contract import backbone_model_name, text_model_name
from vitserve.server import free_port

pytestmark = pytest.mark.triton

NAME = "clip"  # conftest.CLIP_TEXT_MODEL
KEY = secrets.token_urlsafe(16)
MAX_INPUTS = 16
MAX_BODY_MB = 2
PARITY = 0.99999
SENTENCES = ["a photo of a cat.", "an astronaut riding a horse on the moon", "東京の夜景と富士山の写真"]


@contextlib.contextmanager
def running_api(triton_url: str, folder: Path, *args: str):
    """`vitserve api ARGS` (vitserve.api.running) with the tests' bearer key and its own key folder."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(folder / "config"), VITSERVE_EMBEDDINGS_KEY=KEY)
    env.pop("VITSERVE_API_KEY", None)
    log = folder / f"api-{secrets.token_hex(4)}.log"
    with api_process(triton_url, log, *args, env=env) as base:
        yield base


@pytest.fixture(scope="module")
def api(clip_text_server, tmp_path_factory):
    with running_api(
        clip_text_server.grpc_url,
        tmp_path_factory.mktemp("api"),
        "--max-inputs",
        str(MAX_INPUTS),
        "--max-body-mb",
        str(MAX_BODY_MB),
    ) as base:
        yield base


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Two held-out photographs, one as PNG and one as JPEG."""
    from vitserve.exporter.samples import eval_photos

    (_, a), (_, b) = eval_photos()[:2]
    out = {}
    for fmt, im in (("png", a), ("jpeg", b)):
        buf = io.BytesIO()
        im.save(buf, fmt.upper())
        out[fmt] = buf.getvalue()
    return out


def data_url(raw: bytes, fmt: str) -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def triton_embeddings(clip_text_server, photos) -> dict[str, np.ndarray]:
    """What the Triton client gives for SENTENCES and the photos."""
    from vitserve.client import VitClient

    with VitClient(clip_text_server.grpc_url, NAME) as client:
        return {
            "text": client.embed_text(SENTENCES, strict=True).embeddings,
            "images": client.embed([photos["png"], photos["jpeg"]], strict=True).embeddings,
        }


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_client_gets_the_triton_clients_embeddings(api, photos, triton_embeddings):
    """openai.OpenAI(base_url=.../v1).embeddings.create with text and data-URL images mixed in one list:
    the Triton client's embeddings (cosine >= 0.99999), in input order, with usage counted in tokens."""
    import openai

    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0)
    inputs = [SENTENCES[0], data_url(photos["png"], "png"), SENTENCES[1], data_url(photos["jpeg"], "jpeg")]
    inputs.append(SENTENCES[2])
    got = client.embeddings.create(model=NAME, input=inputs)
    assert [d.index for d in got.data] == list(range(5)) and got.model == NAME
    emb = np.array([d.embedding for d in got.data], np.float32)
    text = emb[[0, 2, 4]]
    images = emb[[1, 3]]
    cos_text = _cosines(text, triton_embeddings["text"])
    cos_images = _cosines(images, triton_embeddings["images"])
    print(
        f"openai client vs Triton client: text cosine min {cos_text.min():.7f}, images {cos_images.min():.7f}"
    )
    assert cos_text.min() >= PARITY and cos_images.min() >= PARITY
    assert (
        got.usage.prompt_tokens == got.usage.total_tokens > 3 * 2
    )  # start + end token per sentence at least
    one = client.embeddings.create(model=NAME, input=SENTENCES[1], dimensions=512)  # the model's own dim
    assert _cosines([one.data[0].embedding], triton_embeddings["text"][1:2]).min() >= PARITY
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_langchain_openai_embeddings(api, triton_embeddings):
    """LangChain's OpenAIEmbeddings (no tiktoken: check_embedding_ctx_length=False) gets the same vectors."""
    langchain_openai = pytest.importorskip("langchain_openai")

    emb = langchain_openai.OpenAIEmbeddings(
        model=NAME, base_url=api + "/v1", api_key=KEY, check_embedding_ctx_length=False, max_retries=0
    )
    docs = emb.embed_documents(SENTENCES)
    query = emb.embed_query(SENTENCES[0])
    cos = _cosines(docs, triton_embeddings["text"])
    print(f"langchain OpenAIEmbeddings vs Triton client: cosine min {cos.min():.7f}")
    assert cos.min() >= PARITY
    assert _cosines([query], triton_embeddings["text"][:1]).min() >= PARITY


def test_base64_encoding_gives_the_same_floats(api):
    """encoding_format base64 is the little-endian float32 bytes of exactly the floats `float` gives."""
    body = {"model": NAME, "input": SENTENCES[:2]}
    floats = httpx.post(api + "/v1/embeddings", json=body, headers=_auth(), timeout=60).json()
    b64 = httpx.post(
        api + "/v1/embeddings", json=body | {"encoding_format": "base64"}, headers=_auth(), timeout=60
    ).json()
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], np.float32))


def _bad_cases(photos) -> list[tuple[str, dict | bytes, str | None, str]]:
    """(what, body, the error's param, a phrase of its message)."""
    corrupt = photos["jpeg"][: len(photos["jpeg"]) // 3]
    return [
        ("empty list", {"model": NAME, "input": []}, "input", "empty list"),
        ("empty string", {"model": NAME, "input": ["a", ""]}, "input[1]", "empty string"),
        (
            "bad base64",
            {"model": NAME, "input": ["a", "data:image/png;base64,@@notbase64"]},
            "input[1]",
            "base64",
        ),
        (
            "corrupt image",
            {"model": NAME, "input": [data_url(corrupt, "jpeg")]},
            "input[0]",
            "refused this image",
        ),
        (
            "not an image URL",
            {"model": NAME, "input": ["data:text/plain;base64,aGk="]},
            "input[0]",
            "not an image",
        ),
        ("unknown model", {"model": "gpt-4", "input": "a"}, "model", "not served"),
        ("too long", {"model": NAME, "input": ["x" * 5000]}, "input[0]", "over model 'clip''s limit of 4096"),
        ("too many", {"model": NAME, "input": ["a"] * (MAX_INPUTS + 1)}, "input", f"limit of {MAX_INPUTS}"),
        ("too large", {"model": NAME, "input": ["a" * 1000] * 3000}, None, "over this service's limit"),
        ("dimensions", {"model": NAME, "input": "a", "dimensions": 256}, "dimensions", "512-dimensional"),
        ("token arrays", {"model": NAME, "input": [[1, 2, 3]]}, "input[0]", "token array"),
        ("encoding", {"model": NAME, "input": "a", "encoding_format": "int8"}, "encoding_format", "int8"),
        ("unknown key", {"model": NAME, "input": "a", "temperature": 1}, "temperature", "Unrecognized"),
        ("no model", {"input": "a"}, "model", "required"),
        ("not JSON", b"{not json", None, "not JSON"),
    ]


def test_bad_inputs_answer_400_in_openai_error_shape(api, photos):
    """Every bad request: 400, {"error": {"message", "type": "invalid_request_error", "param", "code"}}, the
    message naming the input; the service still answers afterwards."""
    for what, body, param, phrase in _bad_cases(photos):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(api + "/v1/embeddings", headers=_auth(), timeout=60, **kwargs)
        assert r.status_code == 400, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, (what, error)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
        assert phrase in error["message"], (what, error["message"])
    ok = httpx.post(api + "/v1/embeddings", headers=_auth(), json={"model": NAME, "input": "a"}, timeout=60)
    assert ok.status_code == 200


def test_openai_client_raises_bad_request_with_the_message(api):
    import openai

    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=NAME, input=["ok", ""])
    assert e.value.status_code == 400 and "input[1] is an empty string" in str(e.value)
    assert e.value.body["param"] == "input[1]"


def test_the_api_is_closed_without_its_bearer_key(api):
    """No key or a wrong key: 401 in OpenAI's shape (the openai client: AuthenticationError); health is open."""
    import openai

    body = {"model": NAME, "input": "a"}
    for headers in ({}, _auth("wrong-key"), {"Authorization": KEY}):
        r = httpx.post(api + "/v1/embeddings", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(api + "/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=NAME, input="a"
        )
    assert httpx.get(api + "/health/live", timeout=30).status_code == 200
    assert httpx.get(api + "/health/ready", timeout=30).status_code == 200
    r = httpx.get(api + "/v1/nothing", headers=_auth(), timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def _stats(server, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of `model` from Triton's statistics."""
    status, body = server.api("GET", f"/v2/models/{model}/stats")
    assert status == 200, body
    (entry,) = body["model_stats"]
    return int(entry["inference_count"]), int(entry["execution_count"])


def test_concurrent_requests_reach_triton_together(api, clip_text_server):
    """12 API requests of one sentence sent at once: Triton's text backbone runs them in fewer executions
    than requests (its dynamic batching combined some), which it cannot do if the API sends one request
    after another (each execution would then hold exactly one)."""
    backbone = backbone_model_name(text_model_name(NAME), "fp32", "cpu")
    n = 12
    before = _stats(clip_text_server, backbone)

    def send(i: int) -> int:
        body = {"model": NAME, "input": f"concurrent request number {i}"}
        return httpx.post(api + "/v1/embeddings", json=body, headers=_auth(), timeout=120).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(send, range(n)))
    after = _stats(clip_text_server, backbone)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    print(f"{n} concurrent API requests: {inferences} inferences in {executions} executions at Triton")
    assert codes == [200] * n
    assert inferences >= n  # the token count goes to the tokenizer, not the backbone
    assert executions < inferences


def test_triton_down_answers_503(tmp_path):
    """No Triton at the URL: 503 in OpenAI's error shape (after the client's retries), ready probe 503."""
    from vitserve.api import ApiSettings, create_app

    app = create_app(ApiSettings(triton_url=f"127.0.0.1:{free_port()}", open_access=True, timeout_s=5.0))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.post("/v1/embeddings", json={"model": NAME, "input": "a"})
            ready = await client.get("/health/ready")
        await app.state.service.close()
        return r, ready

    r, ready = asyncio.run(run())
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "server_error" and "unavailable" in r.json()["error"]["message"]
    assert ready.status_code == 503


@pytest.fixture(scope="module")
def closed_tiny_server(tiny_repository, tmp_path_factory):
    """A second tritonserver on the tiny repository, its control APIs behind a key of its own."""
    from vitserve.apikey import CONTROL_APIS
    from vitserve.server import TritonServer

    log = tmp_path_factory.mktemp("logs") / "closed_tiny.log"
    key = secrets.token_urlsafe(16)
    with TritonServer(tiny_repository, log_path=log, restricted=CONTROL_APIS, api_key=key) as server:
        yield server


def test_a_resolver_target_spreads_requests_over_every_server(tiny_server, closed_tiny_server):
    """`--triton-url dns:///PODS:8001` (deploy/api): a gRPC name-resolver target naming several tritonservers
    sends the requests of one client to all of them (round_robin), where one host:port stays on one. Shown
    with two real servers behind an `ipv4:` target (a DNS name maps to one port; Kubernetes pods share it)."""
    import tritonclient.grpc as grpcclient

    from vitserve.client.config import ClientConfig
    from vitserve.client.transport import Transport

    servers = (tiny_server, closed_tiny_server)

    def counts() -> list[int]:  # server.api carries a closed server's key
        out = []
        for server in servers:
            status, body = server.api("GET", "/v2/models/add_one/stats")
            assert status == 200, body
            out.append(int(body["model_stats"][0]["inference_count"]))
        return out

    before = counts()
    target = ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers)

    async def run() -> None:
        transport = Transport(ClientConfig(f"ipv4:{target}", "add_one", api_key=""))
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(8):
            await transport.call("infer", "add_one", [inp])
        await transport.close()

    asyncio.run(run())
    deadline = time.monotonic() + 5  # Triton counts a request just after it answers it
    while (
        sum(spread := [a - b for a, b in zip(counts(), before, strict=True)]) < 8
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert sum(spread) == 8 and min(spread) >= 2, spread


def test_models_list_passes_the_closed_tritons_key(closed_tiny_server):
    """GET /v1/models reads Triton's repository index, a control API: against a closed tritonserver the API
    sends the operator's key it was given (listed: 200), and without it answers 500 saying which key is
    missing."""
    from vitserve.api import ApiSettings, create_app

    async def models(url: str, triton_key: str) -> httpx.Response:
        settings = ApiSettings(triton_url=url, open_access=True, triton_api_key=triton_key, timeout_s=10)
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.get("/v1/models")
        await app.state.service.close()
        return r

    server = closed_tiny_server
    with_key = asyncio.run(models(server.grpc_url, server.api_key))
    without = asyncio.run(models(server.grpc_url, ""))
    assert with_key.status_code == 200, with_key.text
    assert with_key.json() == {"object": "list", "data": []}  # add_one has no image or text side
    assert without.status_code == 500, without.text
    assert "VITSERVE_API_KEY" in without.json()["error"]["message"]
