"""Built-in closed-loop load generator (asyncio, `tritonclient.grpc.aio`).

`concurrency` workers each keep one request in flight: send, wait for the answer, send the next. After
`warmup_s` the measurement window opens for `duration_s`; like perf_analyzer's time windows, a request
counts when it both started and finished inside the window, and throughput is those requests over the
window length. Unlike perf_analyzer a failed request is counted and the run goes on, and the inputs can be
encoded images sent as BYTES (shape [batch, 1]), which perf_analyzer only takes through an input-data file.

Each worker sends over its own gRPC stream (`stream_infer`), one request at a time. A unary `infer` call
costs Python's gRPC about 150 us of client CPU per request here, against perf_analyzer's C++ client's few
tens: on the tiny test model (~0.4 ms per request) unary calls made the built-in generator read 25-45 %
below perf_analyzer, measuring itself rather than the server. A streamed message costs a fraction of a
unary call, and the two generators then agree within about 15 % at concurrency 1-2 on a 2-core host. For
a ViT (tens of ms per request) the difference is noise either way.

Streams are ended by closing the request side, never by cancelling: with tritonserver 2.51 a cancelled
stream that had carried a failed request kept its model "live", and the server then needed its full
30 s exit timeout to stop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from vitserve.errors import ConfigError, missing_extra
from vitserve.perf.inputs import ModelSpec

PERCENTILES = (50, 90, 95, 99)


@dataclass
class LoadResult:
    """What one closed-loop run measured, client side. Latencies are microseconds."""

    concurrency: int
    batch_size: int
    window_s: float
    requests: int
    failures: int
    latencies_us: np.ndarray = field(repr=False)
    errors: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.batch_size

    def percentiles_us(self) -> dict[int, float]:
        """p50/p90/p95/p99 of the successful requests' latencies (NaN when there were none)."""
        if len(self.latencies_us) == 0:
            return {p: float("nan") for p in PERCENTILES}
        # One sorted sample, one interpolation rule: the percentiles cannot cross.
        values = np.percentile(self.latencies_us, PERCENTILES)
        return {p: float(v) for p, v in zip(PERCENTILES, values, strict=True)}


async def _closed_loop(
    url: str,
    spec: ModelSpec,
    payloads: list[dict[str, np.ndarray]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
) -> LoadResult:
    try:
        import grpc
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient
    except ImportError as e:
        raise missing_extra("tritonclient[grpc]", "client") from e
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    def infer_inputs(payload: dict[str, np.ndarray]) -> list:
        out = []
        for t in spec.inputs:
            arr = payload[t.name]
            dtype = "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
            inp = grpcclient.InferInput(t.name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            out.append(inp)
        return out

    # Serialise once: the generator should spend its time waiting on the server, not copying tensors.
    requests = [{"model_name": spec.name, "inputs": infer_inputs(p)} for p in payloads]
    starts: list[int] = []
    ends: list[int] = []
    fail_times: list[int] = []
    errors: list[str] = []
    client = aioclient.InferenceServerClient(url)
    t_open = time.perf_counter_ns() + int(warmup_s * 1e9)
    t_close = t_open + int(duration_s * 1e9)
    # A hung server ends the stream with DEADLINE_EXCEEDED instead of hanging the run.
    stream_timeout_s = warmup_s + duration_s + timeout_s

    def failed(t0: int, message: str) -> None:
        fail_times.append(t0)
        if len(errors) < 5 and message not in errors:
            errors.append(message)

    async def worker(k: int) -> None:
        # One stream per worker with one request in flight, so responses come back in order.
        outbox: asyncio.Queue = asyncio.Queue()

        async def feed():
            while (item := await outbox.get()) is not None:
                yield item

        responses = client.stream_infer(feed(), stream_timeout=stream_timeout_s)
        i = k
        try:
            while (t0 := time.perf_counter_ns()) < t_close:
                outbox.put_nowait(requests[i % len(requests)])
                i += 1
                try:
                    _, error = await responses.__anext__()
                except (grpc.RpcError, InferenceServerException, StopAsyncIteration) as e:
                    # The stream itself broke (server gone, deadline): count it, open a new one.
                    failed(t0, getattr(e, "details", lambda: None)() or str(e) or type(e).__name__)
                    responses.cancel()
                    outbox = asyncio.Queue()
                    await asyncio.sleep(0.01)
                    responses = client.stream_infer(feed(), stream_timeout=stream_timeout_s)
                    continue
                if error is not None:
                    failed(t0, error.message())
                else:
                    starts.append(t0)
                    ends.append(time.perf_counter_ns())
        finally:
            outbox.put_nowait(None)
            await _close_stream(responses)

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(ends, dtype=np.int64)
    inside = (s >= t_open) & (e <= t_close)
    fails = np.asarray(fail_times, dtype=np.int64)
    return LoadResult(
        concurrency=concurrency,
        batch_size=next(iter(payloads[0].values())).shape[0] if spec.batched else 1,
        window_s=(t_close - t_open) / 1e9,
        requests=int(inside.sum()),
        failures=int(((fails >= t_open) & (fails < t_close)).sum()),
        latencies_us=(e[inside] - s[inside]) / 1e3,
        errors=errors,
    )


async def _close_stream(responses) -> None:
    """End the request side and let the server finish the stream; cancel only if it does not."""
    try:
        async with asyncio.timeout(5):
            while True:
                await responses.__anext__()
    except StopAsyncIteration:
        return
    except Exception:  # already broken or too slow to end: cancelling is all that is left
        responses.cancel()


def run_load(
    url: str,
    spec: ModelSpec,
    payloads: list[dict[str, np.ndarray]],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 60.0,
) -> LoadResult:
    """Keep `concurrency` requests in flight against `spec.name` at `url` (gRPC) and measure a window.

    Load runs for `warmup_s + duration_s`; the window is the last `duration_s`. Payloads (from
    `perf.inputs.make_payloads`) are cycled. Failed requests are counted with their first messages kept;
    they never stop the run.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if duration_s <= 0:
        raise ConfigError(f"duration_s must be > 0, got {duration_s}")
    if not payloads:
        raise ConfigError("no request payloads to send")
    return asyncio.run(_closed_loop(url, spec, payloads, concurrency, warmup_s, duration_s, timeout_s))
