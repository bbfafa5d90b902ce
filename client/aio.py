"""AsyncVitClient: embeddings and top-k labels from a deployed vitserve model, over gRPC or HTTP (asyncio).

    async with AsyncVitClient("localhost:8001", model="vitb32") as client:
        result = await client.embed(["a.jpg", "b.png"])      # result.embeddings (2, D), result.errors {}
        top = await client.classify(["a.jpg"], top_k=3)       # [[("cat", 0.91), ("dog", 0.05), ...]]
        text = await client.embed_text(["a photo of a cat"])  # the same space as the image embeddings
        top = await client.classify(["a.jpg"], labels=["cat", "dog", "car"])  # labels chosen now

Strings go to the model's text ensemble `NAME_text` (a CLIP model built with `text: true`); its limits, logit
scale and prompt templates are read from the tokenizer's config (`contract.TextParams`).

Encoded images (paths, bytes, PIL images, HWC uint8 arrays) go to the ensemble `model`; preprocessed CHW
float32 arrays go to a backbone model (`backbone=`, or the one the ensemble routes to). Calls are split into
requests of `batch_size`, at most `max_in_flight` outstanding, reassembled in order. An ensemble whose
`image` is UINT8 [-1] (`preprocess: dali`) gets one image per request, its raw bytes as a [1, len] uint8
tensor, and the server batches them; as DALI fails a whole server batch for one bad image, refused images
are re-sent one at a time before they are reported. Triton fails a whole
request when one of its images is bad, so a request refused for its input is re-sent image by image and
only the bad images are reported, by index (or raised, with `strict=True`).

The connection and what its errors mean are in `transport.py`, the request slots and their shared memory
in `slots.py`, the checks of the user's images in `images.py`; this module batches, splits and reassembles.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitserve.apikey import API_KEY_ENV, key_file
from vitserve.client import images as images_mod
from vitserve.client import shm
from vitserve.client.config import ClientConfig, Protocol
from vitserve.client.images import Images, Item
from vitserve.client.results import ClassifyResult, EmbedResult, failure_message, parse_classification
from vitserve.client.schema import (
    EMBEDDINGS,
    IMAGE_INPUT,
    PIXELS,
    PROBS,
    TEXT_INPUT,
    ModelInfo,
    describe_index,
    index_entries,
    parse_model,
)
from vitserve.client.shm import SharedMemory
from vitserve.client.slots import SlotPool
from vitserve.client.transport import (
    FORBIDDEN,
    INPUT,
    RETRY,
    TIMEOUT,
    Transport,
    error_kind,
    error_text,
    server_answered,
)
from vitserve.contract import (
    TOKENS,
    ContractError,
    TextParams,
    head_ensemble_name,
    text_model_name,
    tokenizer_model_name,
)
from vitserve.errors import ClientError, UnavailableError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0
LABEL_CACHE_SIZE = 64  # label sets whose classifier (text embeddings) a client keeps
TEXT_TARGET = ("text", None)  # the key of the text ensemble among a client's targets


@dataclass
class _Target:
    """A model requests are sent to, checked, with the slots that bound its in-flight requests."""

    info: ModelInfo
    batch_size: int
    pixel_shape: tuple[int, ...] | None  # (3, H, W) for a backbone, None for the ensemble
    embed_dim: int | None
    slots: SlotPool
    image_datatype: str | None = None  # the ensemble's `image`: "BYTES" [N, 1] or "UINT8" [1, len] (DALI)
    text: bool = False  # the text ensemble NAME_text: items are UTF-8 strings

    @property
    def noun(self) -> str:
        return "text" if self.text else "image"


def _key_hint(e: BaseException) -> str:
    if error_kind(e) != FORBIDDEN:
        return ""
    return (
        f"; the server's control APIs need its key: set ${API_KEY_ENV} (or pass api_key=) to the key the "
        f"operator set, or, on the server's host and account, the one in {key_file()}"
    )


class AsyncVitClient:
    """Asyncio client for a vitserve deployment (see the module docstring); use `async with` or `close()`.

    `url` is host:port (default localhost:8001 for gRPC, :8000 for HTTP); `model` the ensemble taking
    encoded images; `backbone` the model for preprocessed tensors (default: the ensemble's own backbone
    step). `shared_memory` ("system" or "cuda") moves tensors through shared memory when the server runs on
    this host; elsewhere, or when it cannot be set up, it falls back to the network with a warning.
    `api_key` (default `$VITSERVE_API_KEY` or the key file) opens the server's restricted control APIs
    (shared memory, the repository index); `tls` / `ca_file` (or an https:// or grpcs:// url) for a TLS
    endpoint such as the proxy of deploy/. A client is bound to the event loop it first runs in."""

    def __init__(
        self,
        url: str | None = None,
        model: str = "vitb32",
        *,
        protocol: Protocol | str = Protocol.GRPC,
        backbone: str | None = None,
        batch_size: int = 8,
        max_in_flight: int = 4,
        timeout_s: float = 30.0,
        retries: int = 3,
        shared_memory: SharedMemory | str = SharedMemory.NONE,
        cuda_device: int = 0,
        api_key: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        self.config = ClientConfig(
            url,
            model,
            protocol,
            backbone,
            batch_size,
            max_in_flight,
            timeout_s,
            retries,
            shared_memory=shared_memory,
            cuda_device=cuda_device,
            api_key=api_key,
            tls=tls,
            ca_file=ca_file,
        )
        self._transport: Transport | None = None
        self._targets: dict[tuple[bool | str, str | None], _Target] = {}
        self._text_params: TextParams | None = None
        self._label_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock: asyncio.Lock | None = None
        self._regions: list[shm.Region] = []  # made here, destroyed in close() (or by the finalizer)
        self._pools: list[SlotPool] = []
        self._finalizer = weakref.finalize(self, shm.destroy_all, self._regions)
        self._closed = False

    @property
    def url(self) -> str:
        return self.config.url

    def _where(self) -> str:
        return f"tritonserver at {self.config.url} ({self.config.protocol.value})"

    # -- connection ---------------------------------------------------------------------------------------

    def _conn(self) -> Transport:
        if self._closed:
            raise ClientError("the client is closed; make a new one")
        if self._transport is None:
            self._transport = Transport(self.config)
            self._lock = asyncio.Lock()
        elif self._transport.loop is not asyncio.get_running_loop():
            raise ClientError(
                "this AsyncVitClient was first used in another event loop; make one client per loop"
            )
        return self._transport

    async def _call(self, method: str, *args, **kwargs) -> Any:
        """`method` of the tritonclient client, retried with exponential backoff while the server is
        unreachable; the last exception is re-raised as it is."""
        transport = self._conn()
        for attempt in range(self.config.retries + 1):
            try:
                return await transport.call(method, *args, **kwargs)
            except Exception as e:
                delay = self._retry_delay(e, attempt, method)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _retry_delay(self, e: Exception, attempt: int, what: str) -> float:
        """The backoff before retry `attempt + 1` of `what` after `e`; re-raises `e` when it is not worth
        retrying (the server answered, or the retries are spent)."""
        if error_kind(e) != RETRY or attempt == self.config.retries:
            raise e
        delay = min(self.config.backoff_s * 2**attempt, MAX_BACKOFF_S)
        log.debug(
            "%s: %s failed (%s); retry %d in %.2f s", self._where(), what, error_text(e), attempt + 1, delay
        )
        return delay

    def _error(self, e: BaseException, doing: str) -> ClientError:
        kind = error_kind(e)
        if kind == RETRY:
            return UnavailableError(
                f"cannot reach {self._where()} while {doing} ({self.config.retries + 1} attempts): {error_text(e)}. "
                "Is the server running there? (`vitserve serve --repository ...`)"
            )
        if kind == TIMEOUT:
            return UnavailableError(
                f"{self._where()} did not answer within {self.config.timeout_s:g} s while {doing}; "
                "raise timeout_s or check the server's load"
            )
        return ClientError(f"{self._where()} refused {doing}: {error_text(e)}{_key_hint(e)}")

    async def server_ready(self) -> bool:
        """Whether the server answers that it is ready (False when it cannot be reached); one attempt."""
        try:
            return bool(await self._conn().call("is_server_ready", timeout_s=min(5.0, self.config.timeout_s)))
        except Exception as e:
            if error_kind(e) in (RETRY, TIMEOUT):
                return False
            raise

    async def repository_index(self) -> list[dict[str, Any]]:
        """The server's repository index as [{name, version, state}] (a control API: it needs the server's
        key when the server is closed; ClientError saying so otherwise)."""
        try:
            return index_entries(await self._call("get_model_repository_index", as_json=True))
        except Exception as e:
            raise self._error(e, "reading the repository index") from e

    async def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the server and `model` are ready; ClientError saying what was missing after `timeout_s`
        (default: the client's timeout_s)."""
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        transport = self._conn()
        deadline = time.monotonic() + timeout_s
        last, server_up = "no answer", False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                if not await transport.call("is_server_ready", timeout_s=min(remaining, 5.0)):
                    last = "the server is live but not ready"
                elif not await transport.call(
                    "is_model_ready", self.config.model, timeout_s=min(remaining, 5.0)
                ):
                    server_up, last = True, f"model {self.config.model!r} is not ready"
                else:
                    return
            except Exception as e:
                last = error_text(e)
            await asyncio.sleep(max(0.0, min(0.25, deadline - time.monotonic())))
        if server_up:
            try:
                index = await transport.call("get_model_repository_index", timeout_s=2.0, as_json=True)
                last += f"; ready models: {describe_index(index)}"
            except Exception as e:
                log.debug("repository index unavailable: %s", e)
        raise ClientError(f"{self._where()} was not ready within {timeout_s:g} s: {last}")

    # -- model checks -------------------------------------------------------------------------------------

    async def _model_info(self, name: str) -> ModelInfo:
        try:
            metadata = await self._call("get_model_metadata", name, as_json=True)
            config = await self._call("get_model_config", name, as_json=True)
        except Exception as e:
            if error_kind(e) in (RETRY, TIMEOUT):
                raise self._error(e, f"reading the metadata of model {name!r}") from e
            try:
                index = describe_index(await self._call("get_model_repository_index", as_json=True))
            except Exception:
                index = "(the repository index could not be read)"
            raise ClientError(
                f"model {name!r} is not loaded on {self._where()} ({error_text(e)}); ready models: {index}"
            ) from e
        return parse_model(metadata, config)

    async def _target(self, tensor: bool, head: str | None = None) -> _Target:
        """The checked model for encoded images (`tensor` False) or for tensors, made on first use; with
        `head`, the ensemble MODEL_HEAD of a model whose heads share one backbone."""
        self._conn()
        async with self._lock:
            if (tensor, head) in self._targets:
                return self._targets[(tensor, head)]
            if head is not None:
                if tensor:
                    raise ClientError(
                        f"head={head!r} takes encoded images (the ensemble {self.config.model}_{head}); "
                        "tensors go to the backbone, which has no head"
                    )
                info = await self._head_info(head)
            elif tensor and self.config.backbone:
                info = await self._model_info(self.config.backbone)
            else:
                info = await self._model_info(self.config.model)
                if tensor and not info.takes_pixels:
                    if info.pixel_step is None:
                        raise ClientError(
                            f"model {info.name!r} does not take preprocessed tensors ({info.describe_inputs()}) "
                            "and routes to no backbone; pass backbone=<name> (a model with input pixel_values)"
                        )
                    info = await self._model_info(info.pixel_step)
            pixel_shape = info.check_pixels() if tensor else None
            image_datatype = None if tensor else info.check_images()
            batch_size = self.config.batch_size
            if image_datatype == "UINT8":
                # a DALI ensemble: images of different lengths cannot share a request, so each goes alone
                # and the server batches them (ragged batching); max_in_flight bounds the requests
                log.debug("model %s takes UINT8 [-1] images: one image per request", info.name)
                batch_size = 1
            elif batch_size > info.max_batch_size:
                log.warning(
                    "batch_size %d is above model %s's max_batch_size %d; sending %d per request",
                    batch_size,
                    info.name,
                    info.max_batch_size,
                    info.max_batch_size,
                )
                batch_size = info.max_batch_size
            embed_dim = info.output_dim(EMBEDDINGS) if EMBEDDINGS in info.outputs else None
            slots = await self._make_slots(info, batch_size, pixel_shape, embed_dim)
            target = _Target(info, batch_size, pixel_shape, embed_dim, slots, image_datatype)
            self._targets[(tensor, head)] = target
            return target

    async def _text_target(self) -> _Target:
        """The checked text ensemble NAME_text and, read once, its TextParams (from the tokenizer's config)."""
        self._conn()
        async with self._lock:
            if TEXT_TARGET in self._targets:
                return self._targets[TEXT_TARGET]
            name = text_model_name(self.config.model)
            try:
                info = await self._model_info(name)
            except ClientError as e:
                raise ClientError(
                    f"model {self.config.model!r} serves no text side ({e}); text needs a CLIP model built "
                    "with `text: true` in models.yaml"
                ) from e
            info.check_text()
            self._text_params = await self._read_text_params()
            batch_size = min(self.config.batch_size, info.max_batch_size, self._text_params.max_texts)
            embed_dim = info.output_dim(EMBEDDINGS)
            slots = await self._make_slots(info, batch_size, None, embed_dim)
            target = _Target(info, batch_size, None, embed_dim, slots, text=True)
            self._targets[TEXT_TARGET] = target
            return target

    async def _read_text_params(self) -> TextParams:
        name = tokenizer_model_name(self.config.model)
        try:
            config = await self._call("get_model_config", name, as_json=True)
        except Exception as e:
            if error_kind(e) in (RETRY, TIMEOUT):
                raise self._error(e, f"reading the config of model {name!r}") from e
            raise ClientError(
                f"model {name!r} (the tokenizer of {self.config.model}_text) is not loaded on {self._where()}: "
                f"{error_text(e)}"
            ) from e
        try:
            return TextParams.from_model_config(config.get("config", config))
        except ContractError as e:
            raise ClientError(str(e)) from e

    async def text_params(self) -> TextParams:
        """The served text side's parameters: tokenizer, context length, logit scale, prompt templates and
        the request limits (`max_text_bytes`, `max_texts`)."""
        await self._text_target()
        return self._text_params

    async def text_model_info(self) -> ModelInfo:
        """What the server says about the text ensemble NAME_text (its `embeddings` size: the model's dim)."""
        return (await self._text_target()).info

    async def _heads(self) -> list[str]:
        """The heads of the model (its ensemble's `HEAD_probs` outputs), [] for a single-head model."""
        info = await self._model_info(self.config.model)
        return sorted(n.removesuffix("_" + PROBS) for n in info.outputs if n.endswith("_" + PROBS))

    async def _head_info(self, head: str) -> ModelInfo:
        heads = await self._heads()
        if head not in heads:
            have = f"its heads are: {', '.join(heads)}" if heads else "it has a single head (omit head=)"
            raise ClientError(f"model {self.config.model!r} has no head {head!r}; {have}")
        return await self._model_info(head_ensemble_name(self.config.model, head))

    async def model_info(self, tensor: bool = False) -> ModelInfo:
        """What the server says about the model encoded images (or, `tensor=True`, tensors) are sent to."""
        return (await self._target(tensor)).info

    # -- shared memory ------------------------------------------------------------------------------------

    async def _make_slots(
        self, info: ModelInfo, batch_size: int, pixel_shape: tuple[int, ...] | None, embed_dim: int | None
    ) -> SlotPool:
        kind = self.config.shared_memory
        if kind is not SharedMemory.NONE and not shm.is_local(self.config.url):
            warnings.warn(
                f"shared_memory={kind.value!r} needs the server on this host, and {self.config.url} is not; "
                "sending tensors over the network",
                RuntimeWarning,
                stacklevel=2,
            )
            kind = SharedMemory.NONE
        if kind is SharedMemory.CUDA:
            reason = await asyncio.to_thread(shm.cuda_available, self.config.cuda_device)
            if reason:
                warnings.warn(f"{reason}; using system shared memory instead", RuntimeWarning, stacklevel=2)
                kind = SharedMemory.SYSTEM
        sizes = {}
        if pixel_shape is not None:
            sizes[PIXELS] = batch_size * math.prod(pixel_shape) * 4
        if embed_dim is not None:  # classification strings cannot go through shared memory; embeddings can
            sizes[EMBEDDINGS] = batch_size * embed_dim * 4

        def pool(kind: SharedMemory) -> SlotPool:
            return SlotPool(
                kind, sizes, self.config.max_in_flight, self._call, self._regions,
                device_id=self.config.cuda_device, timeout_s=self.config.timeout_s, where=self._where(),
            )  # fmt: skip

        slots = pool(kind)
        try:
            await slots.fill()
        except Exception as e:
            if error_kind(e) in (RETRY, TIMEOUT):
                raise self._error(e, "registering shared memory") from e
            warnings.warn(
                f"{kind.value} shared memory could not be set up for model {info.name} ({error_text(e)}"
                f"{_key_hint(e)}); sending tensors over the network",
                RuntimeWarning,
                stacklevel=2,
            )
            slots = pool(SharedMemory.NONE)
            await slots.fill()
        self._pools.append(slots)
        return slots

    # -- requests -----------------------------------------------------------------------------------------

    def _request(self, target: _Target, items: list[Item], top_k: int, slot: shm.Slot):
        """tritonclient inputs and outputs for one request (runs in a worker thread: it encodes images)."""
        module = self._transport.module
        n = len(items)
        if target.text:
            data = np.empty((n, 1), dtype=np.object_)
            for row, item in enumerate(items):
                data[row, 0] = item.value  # UTF-8 bytes, checked by _text_items
            inp = module.InferInput(TEXT_INPUT, [n, 1], "BYTES")
            inp.set_data_from_numpy(data)
        elif target.image_datatype == "UINT8":
            if n != 1:  # _target sets batch_size 1: this is a bug, not bad input
                raise AssertionError(f"{n} images in one UINT8 request")
            raw = images_mod.encoded(items[0])
            data = np.frombuffer(raw, dtype=np.uint8).reshape(1, len(raw))
            inp = module.InferInput(IMAGE_INPUT, list(data.shape), "UINT8")
            inp.set_data_from_numpy(data)
        elif target.pixel_shape is None:
            data = np.empty((n, 1), dtype=np.object_)
            for row, item in enumerate(items):
                data[row, 0] = images_mod.encoded(item)
            inp = module.InferInput(IMAGE_INPUT, [n, 1], "BYTES")
            inp.set_data_from_numpy(data)
        else:
            data = images_mod.pixels(items)
            inp = module.InferInput(PIXELS, list(data.shape), "FP32")
            region = slot.regions.get(PIXELS)
            if region is not None:
                region.write(data)
                inp.set_shared_memory(region.name, data.nbytes)
            else:
                inp.set_data_from_numpy(data)
        if top_k:
            out = module.InferRequestedOutput(PROBS, class_count=top_k)
        else:
            out = module.InferRequestedOutput(EMBEDDINGS)
            region = slot.regions.get(EMBEDDINGS)
            if region is not None:
                out.set_shared_memory(region.name, n * target.embed_dim * 4)
        return [inp], [out]

    def _rows(self, target: _Target, result, n: int, top_k: int, slot: shm.Slot) -> list:
        if top_k:
            probs = result.as_numpy(PROBS)
            if probs is None or probs.size != n * top_k:
                raise ClientError(
                    f"model {target.info.name} returned no top-{top_k} `{PROBS}` for {n} image(s)"
                )
            return [[parse_classification(x) for x in row] for row in probs.reshape(n, top_k)]
        region = slot.regions.get(EMBEDDINGS)
        if region is not None:
            return list(region.read(np.float32, (n, target.embed_dim)))
        emb = result.as_numpy(EMBEDDINGS)
        if emb is None or emb.shape != (n, target.embed_dim):
            got = None if emb is None else emb.shape
            raise ClientError(
                f"model {target.info.name} returned `{EMBEDDINGS}` of shape {got} for {n} image(s)"
            )
        return list(emb)

    async def _infer(self, target: _Target, items: list[Item], top_k: int) -> list:
        """One request, retried with exponential backoff while the server is unreachable. Its slot goes
        back to the pool once the server has answered; otherwise (timeout, cancellation, lost connection)
        it is retired, and a retry takes another (see slots.py)."""
        for attempt in range(self.config.retries + 1):
            slot = await target.slots.acquire()
            answered = True  # until the request is sent
            try:
                # a worker thread encodes the images and writes the slot's input region; a cancelled call
                # still waits for it, so that the slot is never handed on while being written
                prepare = asyncio.ensure_future(asyncio.to_thread(self._request, target, items, top_k, slot))
                try:
                    inputs, outputs = await asyncio.shield(prepare)
                except asyncio.CancelledError:
                    await asyncio.wait([prepare])
                    raise
                answered = False
                try:
                    result = await self._conn().call("infer", target.info.name, inputs, outputs=outputs)
                except Exception as e:
                    answered = server_answered(e)
                    raise
                answered = True
                return self._rows(target, result, len(items), top_k, slot)
            except Exception as e:
                delay = self._retry_delay(e, attempt, "infer")
            finally:
                target.slots.release(slot, answered)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _run_chunk(
        self, target: _Target, items: list[Item], top_k: int
    ) -> tuple[dict[int, Any], dict[int, str]]:
        try:
            rows = await self._infer(target, items, top_k)
            return {item.index: row for item, row in zip(items, rows, strict=True)}, {}
        except ClientError:
            raise
        except Exception as e:
            if error_kind(e, dali=target.image_datatype == "UINT8") != INPUT:
                first, last = items[0].index, items[-1].index
                noun = target.noun
                span = f"{noun} {first}" if first == last else f"{noun}s {first}-{last}"
                raise self._error(e, f"running model {target.info.name!r} on {span}") from e
            if len(items) == 1:
                return {}, {items[0].index: error_text(e)}
        # Triton fails the whole request for one bad image (or string): send them one by one to find it
        parts = await asyncio.gather(*(self._run_chunk(target, [item], top_k) for item in items))
        rows, errors = {}, {}
        for r, err in parts:
            rows.update(r)
            errors.update(err)
        return rows, errors

    async def _run(
        self, target: _Target, items: list[Item], top_k: int
    ) -> tuple[dict[int, Any], dict[int, str]]:
        size = target.batch_size
        tasks = [
            asyncio.ensure_future(self._run_chunk(target, items[i : i + size], top_k))
            for i in range(0, len(items), size)
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        rows, errors = {}, {}
        for r, err in parts:
            rows.update(r)
            errors.update(err)
        if errors and target.image_datatype == "UINT8" and len(items) > 1:
            # DALI fails every request of a server batch for one bad image, so a refused image may have
            # been good: re-send the refused ones one at a time, each alone on the server, and keep only
            # the errors that come back (the server answered, so nothing ran twice)
            by_index = {item.index: item for item in items}
            for index in sorted(errors):
                r, err = await self._run_chunk(target, [by_index[index]], top_k)
                rows.update(r)
                errors.pop(index)
                errors.update(err)
        return rows, errors

    # -- public API ---------------------------------------------------------------------------------------

    async def embed(self, images: Images, *, strict: bool = False) -> EmbedResult:
        """L2-normalized embeddings (N, D) float32 of `images`, in order.

        A bad path or array raises ClientError before anything is sent. An image the server cannot decode
        leaves a NaN row and its message in `.errors[index]`; with `strict=True` it raises ClientError
        naming every failed index instead."""
        batch = images_mod.prepare(images)
        target = await self._target(batch.tensor)
        dim = target.info.output_dim(EMBEDDINGS)
        if batch.tensor:
            images_mod.check_shape(batch.items, target.pixel_shape)
        rows, errors = await self._run(target, batch.items, 0)
        out = np.full((len(batch), dim), np.nan, dtype=np.float32)
        for i, row in rows.items():
            out[i] = row
        if strict and errors:
            raise ClientError(failure_message(errors, {it.index: it.source for it in batch.items}))
        return EmbedResult(out, errors)

    def _text_items(self, texts: str | Sequence[str]) -> list[Item]:
        """The strings of one call as items (UTF-8 bytes), every bad one refused before anything is sent."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
            raise ClientError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        limit = self._text_params.max_text_bytes
        items, problems = [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                problems.append(f"text {i}: {type(text).__name__} is not a string")
                continue
            try:
                raw = text.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(f"text {i}: not encodable as UTF-8 ({e.reason} at {e.start}); remove it")
                continue
            if not raw:
                problems.append(f"text {i}: empty string; send at least one character")
            elif len(raw) > limit:
                problems.append(
                    f"text {i}: {len(raw)} bytes of UTF-8, over the model's max_text_bytes {limit}; shorten it "
                    "(the text tower reads only its first tokens anyway)"
                )
            else:
                short = text if len(text) <= 40 else text[:37] + "..."
                items.append(Item(i, repr(short), raw))
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ClientError(f"{len(problems)} text(s) refused before sending:\n  {shown}{more}")
        return items

    async def embed_text(self, texts: str | Sequence[str], *, strict: bool = False) -> EmbedResult:
        """L2-normalised text embeddings (N, D) float32 of `texts` (a string or a list), in order, in the
        same space as the image embeddings (the model's `NAME_text` ensemble).

        An empty string, one that is not valid UTF-8 or longer than the model's `max_text_bytes` raises
        ClientError before anything is sent. A string the server refuses leaves a NaN row and its message in
        `.errors[index]` (with `strict=True`, ClientError instead)."""
        target = await self._text_target()
        items = self._text_items(texts)
        rows, errors = await self._run(target, items, 0)
        out = np.full((len(items), target.embed_dim), np.nan, dtype=np.float32)
        for i, row in rows.items():
            out[i] = row
        if strict and errors:
            raise ClientError(failure_message(errors, {it.index: it.source for it in items}, noun="text"))
        return EmbedResult(out, errors)

    async def text_tokens(self, texts: str | Sequence[str]) -> np.ndarray:
        """open_clip's tokens of `texts` as the server makes them (int64 [N, context_length], zero padded),
        from the tokenizer model `NAME_text_tokenize`: what a text costs (e.g. the API's `usage`)."""
        await self._text_target()
        items = self._text_items(texts)
        name, size = tokenizer_model_name(self.config.model), self._text_params.max_texts
        module = self._transport.module

        async def one(chunk: list[Item]) -> np.ndarray:
            data = np.empty((len(chunk), 1), dtype=np.object_)
            for row, item in enumerate(chunk):
                data[row, 0] = item.value
            inp = module.InferInput(TEXT_INPUT, [len(chunk), 1], "BYTES")
            inp.set_data_from_numpy(data)
            try:
                result = await self._call("infer", name, [inp], outputs=[module.InferRequestedOutput(TOKENS)])
            except Exception as e:
                raise self._error(e, f"tokenizing {len(chunk)} text(s) with model {name!r}") from e
            return result.as_numpy(TOKENS)

        parts = await asyncio.gather(*(one(items[i : i + size]) for i in range(0, len(items), size)))
        return np.concatenate(parts) if parts else np.zeros((0, self._text_params.context_length), np.int64)

    async def label_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """The zero-shot classifier of `labels`, (L, D) float32: for each label, the mean over the served
        prompt templates ("a photo of a {}.", ...) of the normalised prompt embeddings, renormalised (what
        the exported zero-shot head computes at build time). Cached per (model, labels, templates)."""
        if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
            raise ClientError(f"labels must be a non-empty list of class names, got {labels!r}")
        bad = [f"{i}: {x!r}" for i, x in enumerate(labels) if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ClientError(f"labels must be non-empty strings; refused label(s) {', '.join(bad[:10])}")
        dupes = sorted({x for x in labels if list(labels).count(x) > 1})
        if dupes:
            raise ClientError(f"labels repeat {dupes}; give each class once")
        params = await self.text_params()
        key = (self.config.model, tuple(labels), params.templates)
        if key in self._label_cache:
            self._label_cache.move_to_end(key)
            return self._label_cache[key]
        prompts = [t.format(label) for label in labels for t in params.templates]
        emb = (await self.embed_text(prompts, strict=True)).embeddings.astype(np.float64)
        mean = emb.reshape(len(labels), len(params.templates), -1).mean(axis=1)
        weights = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
        self._label_cache[key] = weights
        while len(self._label_cache) > LABEL_CACHE_SIZE:
            self._label_cache.popitem(last=False)
        return weights

    async def _classify_labels(
        self, images: Images, labels: Sequence[str], top_k: int, strict: bool
    ) -> ClassifyResult:
        weights = await self.label_embeddings(labels)
        scale = self._text_params.logit_scale
        result = await self.embed(images, strict=strict)
        logits = (scale * (result.embeddings.astype(np.float64) @ weights.T.astype(np.float64))).astype(
            np.float32
        )
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        k = min(top_k, len(labels))
        predictions: list[list[tuple[str, float]] | None] = []
        for i, row in enumerate(probs):
            if i in result.errors:
                predictions.append(None)
                continue
            order = np.argsort(-row, kind="stable")[:k]
            predictions.append([(labels[j], float(row[j])) for j in order])
        return ClassifyResult(predictions, result.errors, logits=logits)

    async def classify(
        self,
        images: Images,
        top_k: int = 5,
        *,
        strict: bool = False,
        head: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> ClassifyResult:
        """The `top_k` (label, score) pairs of each image, best first, from the model's `probs` output and
        its label file (Triton's classification extension). `head`: which head of a model whose heads share
        one backbone (models.yaml `heads:`). Failures as in `embed`.

        `labels`: classify against these class names instead, chosen now (a CLIP model served with its text
        side): logits = logit_scale * image embedding . label_embeddings(labels), the exported zero-shot
        head's computation, scores their softmax; `.logits` holds them all."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ClientError(f"top_k {top_k!r} must be an integer >= 1")
        if labels is not None:
            if head is not None:
                raise ClientError("pass labels= or head=, not both (labels classify with the text side)")
            return await self._classify_labels(images, labels, top_k, strict)
        batch = images_mod.prepare(images)
        target = await self._target(batch.tensor, head)
        if head is None and PROBS not in target.info.outputs:
            heads = await self._heads()
            if heads:
                raise ClientError(
                    f"model {self.config.model!r} has several heads: pass head= one of {', '.join(heads)}"
                )
        classes = target.info.output_dim(PROBS)
        if PROBS not in target.info.labelled:
            log.warning(
                "model %s has no label file on `%s`; labels are class indices", target.info.name, PROBS
            )
        if batch.tensor:
            images_mod.check_shape(batch.items, target.pixel_shape)
        rows, errors = await self._run(target, batch.items, min(top_k, classes))
        if strict and errors:
            raise ClientError(failure_message(errors, {it.index: it.source for it in batch.items}))
        return ClassifyResult([rows.get(i) for i in range(len(batch))], errors)

    async def close(self) -> None:
        """Unregister and destroy shared memory, close the connection; safe to call twice."""
        if self._closed:
            return
        try:
            if self._transport is not None:
                for pool in self._pools:
                    await pool.close()
                await self._transport.close()
        finally:
            self._closed = True
            shm.destroy_all(self._regions)
            self._finalizer.detach()

    async def __aenter__(self) -> AsyncVitClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
