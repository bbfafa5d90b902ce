"""VitClient: the blocking face of AsyncVitClient, for scripts and notebooks.

It runs one AsyncVitClient on a private event loop in a daemon thread, so both faces share one
implementation of batching, bounded concurrency, retries, shared memory and per-image errors, and the
blocking client works from any thread, inside a running event loop (Jupyter) included.

    with VitClient("localhost:8001", model="vitb32") as client:
        emb = client.embed(["a.jpg", "b.png"]).embeddings
        text = client.embed_text(["a photo of a cat"]).embeddings
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from vitserve.client.aio import AsyncVitClient
from vitserve.client.config import Protocol
from vitserve.client.images import Images
from vitserve.client.results import ClassifyResult, EmbedResult
from vitserve.client.schema import ModelInfo
from vitserve.client.shm import SharedMemory
from vitserve.contract import TextParams
from vitserve.errors import ClientError

T = TypeVar("T")


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: AsyncVitClient) -> None:
    """Close `client` on its loop, then stop the loop; also run for a client that was never closed."""
    if loop.is_closed():
        return
    if thread.is_alive():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10.0)
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5.0)
    if not thread.is_alive():
        loop.close()


class VitClient:
    """Blocking client for a vitserve deployment, with AsyncVitClient's arguments and methods; use `with`
    or `close()` (which also unregisters and destroys shared memory)."""

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
        self._async = AsyncVitClient(
            url,
            model,
            protocol=protocol,
            backbone=backbone,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
            retries=retries,
            shared_memory=shared_memory,
            cuda_device=cuda_device,
            api_key=api_key,
            tls=tls,
            ca_file=ca_file,
        )
        self.config = self._async.config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vitserve-client", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._loop, self._thread, self._async)

    @property
    def url(self) -> str:
        return self.config.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ClientError("the client is closed; make a new one")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: stop the requests in flight too
            raise

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """See AsyncVitClient.wait_until_ready."""
        self._run(self._async.wait_until_ready(timeout_s))

    def embed(self, images: Images, *, strict: bool = False) -> EmbedResult:
        """See AsyncVitClient.embed."""
        return self._run(self._async.embed(images, strict=strict))

    def classify(
        self,
        images: Images,
        top_k: int = 5,
        *,
        strict: bool = False,
        head: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> ClassifyResult:
        """See AsyncVitClient.classify."""
        return self._run(self._async.classify(images, top_k, strict=strict, head=head, labels=labels))

    def embed_text(self, texts: str | Sequence[str], *, strict: bool = False) -> EmbedResult:
        """See AsyncVitClient.embed_text."""
        return self._run(self._async.embed_text(texts, strict=strict))

    def label_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """See AsyncVitClient.label_embeddings."""
        return self._run(self._async.label_embeddings(labels))

    def text_tokens(self, texts: str | Sequence[str]) -> np.ndarray:
        """See AsyncVitClient.text_tokens."""
        return self._run(self._async.text_tokens(texts))

    def text_params(self) -> TextParams:
        """See AsyncVitClient.text_params."""
        return self._run(self._async.text_params())

    def model_info(self, tensor: bool = False) -> ModelInfo:
        """See AsyncVitClient.model_info."""
        return self._run(self._async.model_info(tensor))

    def close(self) -> None:
        """Unregister and destroy shared memory, close the connection, stop the loop thread; safe twice."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())  # here, so that its errors reach the caller
        finally:
            self._finalizer()

    def __enter__(self) -> VitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
