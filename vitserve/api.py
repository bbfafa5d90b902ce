"""`vitserve api`: an OpenAI-compatible embeddings endpoint in front of Triton (FastAPI on uvicorn).

    POST /v1/embeddings  {"model": "vitb32", "input": "a photo of a cat" | ["a dog", "data:image/png;base64,..."],
                          "encoding_format": "float" | "base64", "dimensions": D, "user": "..."}
      -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}, ...],
          "model": "vitb32", "usage": {"prompt_tokens": N, "total_tokens": N}}
    GET  /v1/models      the models served (OpenAI's list shape)
    GET  /health/live, /health/ready   for probes (ready: the Triton server answers ready)

Text goes to the model's `NAME_text` ensemble, images (`data:image/...;base64,` URLs) to `NAME`: both give
L2-normalised embeddings in one space, so a list may mix them. `/v1/models` lists every model the Triton server
serves with an image side (`NAME` and `NAME_preprocess` ready) or a text side (`NAME_text` ready): CLIP
models take both, image-only models (DINOv2) take images, and text sent to them is refused naming the model.

The service holds one AsyncVitClient per model on its event loop (gRPC by default) and never waits for one
request before sending another: concurrent API requests reach Triton concurrently, where dynamic batching
combines them. Bad input is refused with 400 in OpenAI's error shape
(`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`) naming the input (`input[3]`)
and what to do; an unreachable Triton answers 503, a missing or wrong bearer key 401.

Closed by default: requests need `Authorization: Bearer KEY` (what OpenAI clients send as their api_key), KEY
being `$VITSERVE_EMBEDDINGS_KEY` or the key file `~/.config/vitserve/embeddings_api_key` (made with a random
key, mode 0600, on first start; vitserve/apikey.py). It is the API users' key, not the operator's control key
of the Triton server, which the service itself reads as every vitserve client does (`$VITSERVE_API_KEY` or its
key file) to list the repository for `/v1/models`. `open_access=True` (`vitserve api --open`) serves without
a key.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request, imported inside
# create_app since fastapi is an optional extra) as objects.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import EMBEDDINGS, preprocess_model_name, text_model_name, tokenizer_model_name
from vitserve.errors import ClientError, ConfigError, UnavailableError, missing_extra

log = logging.getLogger(__name__)

DEFAULT_PORT = 9000
DEFAULT_TRITON_URL = "localhost:8001"
MAX_BODY_BYTES = 64 * 1024 * 1024  # the same request-body limit as the ingress (deploy/ingress)
MAX_INPUTS = 256  # strings and images in one request
ENCODING_FORMATS = ("float", "base64")
REQUEST_KEYS = ("model", "input", "encoding_format", "dimensions", "user")
IMAGE_TYPES = ("png", "jpeg", "jpg", "webp", "gif", "bmp", "tiff")
_DATA_URL = re.compile(r"^data:image/(?P<type>[A-Za-z0-9.+-]+);base64,", re.ASCII)


@dataclass(frozen=True)
class ApiSettings:
    """What `vitserve api` serves and its limits, checked at the door.

    `bearer_key`: the key requests must carry (None serves without one, only with `open_access`);
    `triton_api_key`: the Triton server's control key for the repository index (None: `$VITSERVE_API_KEY` or
    its key file, as every client); `batch_size` and `max_in_flight`: the client's requests to Triton per
    model (an API request of more images than `batch_size` is sent as several requests at once)."""

    triton_url: str = DEFAULT_TRITON_URL
    bearer_key: str | None = field(default=None, repr=False)
    open_access: bool = False
    triton_api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES
    max_inputs: int = MAX_INPUTS
    batch_size: int = 8
    max_in_flight: int = 64
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.bearer_key is None and not self.open_access:
            raise ConfigError("vitserve api needs a bearer key (bearer_key=) or open_access=True (--open)")
        for name in ("max_body_bytes", "max_inputs", "batch_size", "max_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} {value!r} must be an integer >= 1")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _unavailable(e: Exception) -> ApiError:
    return ApiError(
        503, f"the Triton server is unavailable: {e}", None, "service_unavailable", "server_error"
    )


@dataclass
class _Model:
    """A served model as the API uses it: its client, its sides and their limits."""

    client: Any  # AsyncVitClient
    dim: int
    image: bool
    text: bool
    max_text_bytes: int | None = None


def decode_data_url(value: str, param: str) -> bytes:
    """The image bytes of a `data:image/TYPE;base64,...` URL; ApiError naming `param` otherwise."""
    m = _DATA_URL.match(value)
    if m is None:
        head = value[:40] + ("..." if len(value) > 40 else "")
        raise _bad(
            f"{param} is a data URL but not an image in base64 ({head!r}); send "
            "'data:image/png;base64,...' or 'data:image/jpeg;base64,...'",
            param,
            "invalid_image_url",
        )
    if m["type"].lower() not in IMAGE_TYPES:
        raise _bad(
            f"{param}: image type {m['type']!r} is not served; send one of {', '.join(IMAGE_TYPES)}",
            param,
            "invalid_image_url",
        )
    try:
        raw = base64.b64decode(value[m.end() :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(
            f"{param}: the image's base64 does not decode ({e}); encode the file's bytes with standard base64",
            param,
            "invalid_base64",
        ) from None
    if not raw:
        raise _bad(f"{param}: the data URL holds no bytes", param, "invalid_image_url")
    return raw


class EmbeddingsService:
    """The endpoint's logic, independent of the web framework: parse, check, send to Triton, answer."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._models: dict[str, _Model] = {}
        self._pending: dict[str, asyncio.Future] = {}
        self._health = None

    def _client(self, model: str):
        from vitserve.client import AsyncVitClient

        s = self.settings
        return AsyncVitClient(
            s.triton_url,
            model,
            batch_size=s.batch_size,
            max_in_flight=s.max_in_flight,
            timeout_s=s.timeout_s,
            api_key=s.triton_api_key,
        )

    async def close(self) -> None:
        clients = [m.client for m in self._models.values()]
        if self._health is not None:
            clients.append(self._health)
        self._models.clear()
        for c in clients:
            await c.close()

    # -- models --------------------------------------------------------------------------------------

    async def model(self, name: str) -> _Model:
        """The served model `name` (its sides checked once, then kept); 400 when Triton serves no such
        model, 503 when Triton cannot be reached."""
        if name in self._models:
            return self._models[name]
        if name not in self._pending:  # one look-up per name, however many requests ask at once
            self._pending[name] = asyncio.ensure_future(self._look_up(name))
        future = self._pending[name]
        try:
            found = await asyncio.shield(future)
        finally:
            if future.done():
                self._pending.pop(name, None)
        self._models.setdefault(name, found)
        return self._models[name]

    async def _look_up(self, name: str) -> _Model:
        client = self._client(name)
        try:
            image_dim = text_dim = params = None
            why = []
            try:
                image_dim = (await client.model_info()).output_dim(EMBEDDINGS)
            except UnavailableError:
                raise
            except ClientError as e:
                why.append(str(e))
            try:
                params = await client.text_params()
                text_dim = (await client.text_model_info()).output_dim(EMBEDDINGS)
            except UnavailableError:
                raise
            except ClientError as e:
                why.append(str(e))
            if image_dim is None and text_dim is None:
                raise _bad(
                    f"model {name!r} is not served by the Triton server at {self.settings.triton_url} (GET "
                    "/v1/models lists the models)",
                    "model",
                    "model_not_found",
                )
            if image_dim is not None and text_dim is not None and image_dim != text_dim:
                raise ApiError(
                    500,
                    f"model {name!r}: image embeddings have {image_dim} dimensions, text embeddings {text_dim}; "
                    "rebuild the repository",
                    type_="server_error",
                )
            return _Model(
                client,
                image_dim or text_dim,
                image=image_dim is not None,
                text=text_dim is not None,
                max_text_bytes=params.max_text_bytes if params else None,
            )
        except UnavailableError as e:
            await client.close()
            raise _unavailable(e) from e
        except BaseException:
            await client.close()
            raise

    async def list_models(self) -> dict[str, Any]:
        """OpenAI's model list: every model served with an image side or a text side."""
        if self._health is None:
            self._health = self._client("_")
        try:
            index = await self._health.repository_index()
        except UnavailableError as e:
            raise _unavailable(e) from e
        except ClientError as e:
            raise ApiError(500, f"cannot list the models: {e}", None, "upstream_error", "server_error") from e
        ready = {e["name"] for e in index if e.get("state") == "READY"}
        image_side = {n for n in ready if preprocess_model_name(n) in ready}
        suffix = text_model_name("")  # NAME_text: a text side, served with its tokenizer
        text_side = {
            n.removesuffix(suffix)
            for n in ready
            if n.endswith(suffix) and tokenizer_model_name(n.removesuffix(suffix)) in ready
        }
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "vitserve"}
            for n in sorted(image_side | text_side)
        ]
        return {"object": "list", "data": data}

    async def ready(self) -> bool:
        if self._health is None:
            self._health = self._client("_")
        return await self._health.server_ready()

    # -- embeddings ----------------------------------------------------------------------------------

    def parse(self, body: bytes) -> dict[str, Any]:
        """The checked request: JSON object, known keys, their types (what needs no model)."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            raise _bad(
                f"the request body is not JSON ({e}); send application/json", None, "invalid_json"
            ) from None
        if not isinstance(request, dict):
            raise _bad(
                "the request body must be a JSON object with `model` and `input`", None, "invalid_json"
            )
        for key in request:
            if key not in REQUEST_KEYS:
                raise _bad(
                    f"Unrecognized request argument supplied: {key} (known: {', '.join(REQUEST_KEYS)})",
                    key,
                    "unknown_parameter",
                )
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise _bad(
                "`model` is required: the name of a served model (GET /v1/models)", "model", "missing_model"
            )
        if "input" not in request:
            raise _bad("`input` is required: a string or a list of strings", "input", "missing_input")
        inputs = request["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise _bad("`input` must be a string or a list of strings", "input", "invalid_input")
        if not inputs:
            raise _bad("`input` is an empty list; send at least one string", "input", "empty_input")
        if len(inputs) > self.settings.max_inputs:
            raise _bad(
                f"`input` has {len(inputs)} items, over this service's limit of {self.settings.max_inputs}; "
                "split it into several requests",
                "input",
                "too_many_inputs",
            )
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                what = "a token array" if isinstance(x, int | list) else type(x).__name__
                raise _bad(
                    f"input[{i}] is {what}; this service takes strings (text, or data:image/...;base64, URLs), "
                    "not token arrays",
                    f"input[{i}]",
                    "invalid_input",
                )
        fmt = request.get("encoding_format", "float")
        if fmt not in ENCODING_FORMATS:
            raise _bad(
                f"encoding_format {fmt!r} is not one of {', '.join(ENCODING_FORMATS)}",
                "encoding_format",
                "invalid_encoding_format",
            )
        dims = request.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
            raise _bad(f"dimensions {dims!r} must be an integer", "dimensions", "invalid_dimensions")
        return {"model": model, "input": inputs, "encoding_format": fmt, "dimensions": dims}

    def _split(self, inputs: list[str], model: str, served: _Model) -> tuple[list, list]:
        """(text (index, str)), (image (index, bytes)): every item checked against the model's limits."""
        texts, images = [], []
        for i, x in enumerate(inputs):
            param = f"input[{i}]"
            if x.startswith("data:"):
                if not served.image:
                    raise _bad(f"{param}: model {model!r} serves text only; it takes no images", param)
                images.append((i, decode_data_url(x, param)))
                continue
            if not served.text:
                raise _bad(
                    f"{param}: model {model!r} serves images only (no text side); send images as "
                    "data:image/...;base64, URLs, or text to a CLIP model served with `text: true`",
                    param,
                    "text_not_supported",
                )
            if not x:
                raise _bad(f"{param} is an empty string; send at least one character", param, "empty_input")
            try:
                size = len(x.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise _bad(
                    f"{param} is not valid Unicode ({e.reason}); remove the lone surrogate", param
                ) from None
            if size > served.max_text_bytes:
                raise _bad(
                    f"{param} is {size} bytes of UTF-8, over model {model!r}'s limit of {served.max_text_bytes}; "
                    "shorten it (the text tower reads only its first tokens)",
                    param,
                    "input_too_long",
                )
            texts.append((i, x))
        return texts, images

    async def embeddings(self, body: bytes) -> dict[str, Any]:
        """Answer one POST /v1/embeddings (raises ApiError)."""
        request = self.parse(body)
        model = request["model"]
        served = await self.model(model)
        dims = request["dimensions"]
        if dims is not None and dims != served.dim:
            raise _bad(
                f"dimensions {dims} is not supported: model {model!r} gives {served.dim}-dimensional embeddings "
                f"(omit `dimensions`, or pass {served.dim})",
                "dimensions",
                "invalid_dimensions",
            )
        texts, images = self._split(request["input"], model, served)
        client = served.client
        jobs = []
        if texts:
            strings = [t for _, t in texts]
            jobs += [client.embed_text(strings), client.text_tokens(strings)]
        if images:
            jobs.append(client.embed([b for _, b in images]))
        try:
            results = await asyncio.gather(*jobs)
        except UnavailableError as e:
            raise _unavailable(e) from e
        except ClientError as e:
            raise ApiError(500, f"model {model!r}: {e}", None, "upstream_error", "server_error") from e
        out = np.empty((len(request["input"]), served.dim), np.float32)
        tokens = 0
        if texts:
            emb, toks = results[0], results[1]
            self._raise_for(emb.errors, [i for i, _ in texts], "text")
            out[[i for i, _ in texts]] = emb.embeddings
            tokens = int(np.count_nonzero(toks))
        if images:
            emb = results[-1]
            self._raise_for(emb.errors, [i for i, _ in images], "image")
            out[[i for i, _ in images]] = emb.embeddings
        if request["encoding_format"] == "base64":
            values = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in out]
        else:
            values = out.tolist()
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @staticmethod
    def _raise_for(errors: dict[int, str], positions: list[int], what: str) -> None:
        if errors:
            j = min(errors)
            param = f"input[{positions[j]}]"
            more = f" ({len(errors) - 1} more {what}(s) refused too)" if len(errors) > 1 else ""
            code = "invalid_image" if what == "image" else "invalid_input"
            raise _bad(f"{param}: the server refused this {what}: {errors[j]}{more}", param, code)


def create_app(settings: ApiSettings):
    """The FastAPI application of `vitserve api` (serve it with uvicorn)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise missing_extra("fastapi", "api") from e
    from contextlib import asynccontextmanager

    service = EmbeddingsService(settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    app = FastAPI(title="vitserve embeddings", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    def answer(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def authorize(request: Request) -> None:
        key = settings.bearer_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key" if not given else "an incorrect API key"
            raise ApiError(
                401,
                f"You didn't provide a valid API key ({what}): send `Authorization: Bearer KEY` (OpenAI clients: "
                "api_key=KEY), KEY being the service's $VITSERVE_EMBEDDINGS_KEY or key file",
                None,
                "invalid_api_key",
            )

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _bad(
                f"the request body is {int(declared)} bytes, over this service's limit of {limit}; send fewer or "
                "smaller images per request",
                None,
                "request_too_large",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _bad(
                    f"the request body is over this service's limit of {limit} bytes; send fewer or smaller "
                    "images per request",
                    None,
                    "request_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return answer(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return answer(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("vitserve api: %s %s failed", request.method, request.url.path)
        return answer(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error"))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        return JSONResponse(await service.embeddings(await read_body(request)))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return JSONResponse(await service.list_models())

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if await service.ready():
            return {"status": "ready"}
        raise ApiError(
            503, f"the Triton server at {settings.triton_url} is not ready", None, None, "server_error"
        )

    return app


def serve(settings: ApiSettings, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the API with uvicorn until SIGINT/SIGTERM."""
    try:
        import uvicorn
    except ImportError as e:
        raise missing_extra("uvicorn", "api") from e
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def running(triton_url: str, log_path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60):
    """`vitserve api ARGS` as a subprocess on a free port of 127.0.0.1, in its own process group (stopped by
    group, as every server vitserve starts), until it answers /health/live; yields its base URL. For the
    tests and perf/bench_text.py."""
    import httpx

    from vitserve.server import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vitserve.cli",
        "api",
        "--port",
        str(port),
        "--triton-url",
        triton_url,
        *args,
    ]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env or dict(os.environ)
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vitserve api exited:\n{Path(log_path).read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health/live", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vitserve api did not start in {timeout_s:.0f} s:\n{Path(log_path).read_text()}"
                )
            time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
