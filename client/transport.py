"""One connection to tritonserver (gRPC or HTTP, asyncio), with a deadline on every call, and what its
exceptions mean: retry (the server is unreachable), a timeout, the input was refused, or something else.
"""

from __future__ import annotations

import asyncio

from vitserve.apikey import headers
from vitserve.client.config import ClientConfig, Protocol, is_resolver_target
from vitserve.errors import missing_extra

# What an exception from tritonclient means for the request: try again, give up, blame the input, or the key.
RETRY, TIMEOUT, INPUT, NOT_FOUND, FORBIDDEN, OTHER = (
    "retry",
    "timeout",
    "input",
    "not_found",
    "forbidden",
    "other",
)
# tritonserver refuses a restricted API without its key with HTTP 403, and over gRPC with UNAVAILABLE and
# this message (which must not be retried as if the server were down)
_RESTRICTED = "is restricted, expecting header"
# dali_backend reports every error of a request, a bad image's decode failure included, as
# TRITONSERVER_ERROR_UNKNOWN ("DALI error: ..." / "Runtime error: ...": ErrorHandler() in its
# src/dali_model_instance.cc). tritonserver's HTTP endpoint answers UNKNOWN with 400, its gRPC endpoint with
# StatusCode.UNKNOWN: for a DALI ensemble the two mean what INVALID_ARGUMENT means elsewhere.
_DALI_STATUS_KIND = {"StatusCode.UNKNOWN": INPUT}
# Calls to APIs vitserve leaves open (inference, health, metadata, model config): they go without the key,
# so that it travels only where it is needed.
_OPEN_CALLS = frozenset(
    ("infer", "is_server_live", "is_server_ready", "is_model_ready", "get_server_metadata",
     "get_model_metadata", "get_model_config")
)  # fmt: skip
_STATUS_KIND = {
    "StatusCode.UNAVAILABLE": RETRY,
    "503": RETRY,
    "502": RETRY,  # a proxy (nginx) found no replica: nothing ran, safe to retry
    "StatusCode.DEADLINE_EXCEEDED": TIMEOUT,
    "504": TIMEOUT,
    "StatusCode.INVALID_ARGUMENT": INPUT,
    "400": INPUT,
    "StatusCode.NOT_FOUND": NOT_FOUND,
    "404": NOT_FOUND,
}
# Statuses that do not prove the server has finished with a request: it may not have answered at all.
_UNANSWERED = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.CANCELLED",
    "502",
    "503",
    "504",
}


def error_kind(e: BaseException, dali: bool = False) -> str:
    """RETRY (server unreachable), TIMEOUT, INPUT (the request's data was refused), NOT_FOUND, FORBIDDEN
    (a restricted API without the right key) or OTHER. `dali`: the request went to a DALI ensemble (its
    decode errors come back as UNKNOWN)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        status = str(e.status())
        if status == "403" or _RESTRICTED in (e.message() or ""):
            return FORBIDDEN
        if dali and status in _DALI_STATUS_KIND:
            return _DALI_STATUS_KIND[status]
        return _STATUS_KIND.get(status, OTHER)
    if isinstance(e, TimeoutError):  # asyncio's and aiohttp's timeouts; checked before OSError, its base
        return TIMEOUT
    if isinstance(e, OSError):
        return RETRY
    try:
        import aiohttp
    except ImportError:
        return OTHER
    return RETRY if isinstance(e, aiohttp.ClientConnectionError) else OTHER


def server_answered(e: BaseException) -> bool:
    """Whether `e`, raised by a request, is the server's own answer to it (after which the server holds
    nothing of the request), rather than a timeout, a cancellation or a lost connection (after which the
    request may still be queued or running on the server)."""
    from tritonclient.utils import InferenceServerException

    return isinstance(e, InferenceServerException) and str(e.status()) not in _UNANSWERED | {"None"}


def error_text(e: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        return e.message() or str(e)
    return str(e) or type(e).__name__


class Transport:
    """One tritonclient aio client, with a deadline on every call."""

    def __init__(self, config: ClientConfig) -> None:
        self.grpc = config.protocol is Protocol.GRPC
        self.timeout_s = config.timeout_s
        try:
            if self.grpc:
                import tritonclient.grpc as module
                import tritonclient.grpc.aio as aio

                self.client = aio.InferenceServerClient(
                    config.url,
                    ssl=config.tls,
                    root_certificates=config.ca_file,
                    channel_args=[
                        ("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
                        ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
                        # a restarted server is noticed within a second, not after gRPC's 2-minute backoff
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ]
                    # several servers behind one target: each request to the next ready one
                    + ([("grpc.lb_policy_name", "round_robin")] if is_resolver_target(config.url) else []),
                )
            else:
                import tritonclient.http as module
                import tritonclient.http.aio as aio

                ssl_context = None
                if config.tls:
                    import ssl

                    ssl_context = ssl.create_default_context(cafile=config.ca_file)
                self.client = aio.InferenceServerClient(
                    config.url,
                    conn_limit=max(8, 2 * config.max_in_flight),
                    conn_timeout=config.timeout_s,
                    ssl=config.tls,
                    ssl_context=ssl_context,
                )
        except (ImportError, RuntimeError) as e:  # tritonclient.http.aio raises RuntimeError without aiohttp
            raise missing_extra(f"tritonclient[{config.protocol.value}]", "client") from e
        self.module = module
        self.headers = headers(config.api_key, self.grpc)
        self.loop = asyncio.get_running_loop()

    async def call(self, method: str, *args, timeout_s: float | None = None, as_json: bool = False, **kwargs):
        timeout_s = timeout_s or self.timeout_s
        if self.grpc:
            kwargs["client_timeout"] = timeout_s
            if as_json:
                kwargs["as_json"] = True
        if self.headers and method not in _OPEN_CALLS:
            kwargs["headers"] = self.headers
        # the protocol's own deadline ends the call; this one is the backstop for anything it misses
        return await asyncio.wait_for(getattr(self.client, method)(*args, **kwargs), timeout_s + 1.0)

    async def close(self) -> None:
        await self.client.close()
