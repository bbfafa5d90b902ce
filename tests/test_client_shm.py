"""Shared-memory slots are never reused while the server may still use them (real tritonserver).

`slow_echo` (tests/data/slow_echo_model.py) is backbone-shaped: it returns its input flattened, after
sleeping as long as the input asks, and logs which request tags each execution saw. With one instance and
no dynamic batching, a request sent while it sleeps is queued; the client's timeout then ends the call but
not the queued request, which runs later. Had its slot gone to the next request, the stale request would
read that request's input region (the log shows two tags in one execution) and write into its output
region; every later answer must be exactly the echo of what was sent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from vitserve.client import AsyncVitClient
from vitserve.errors import ClientError
from vitserve.server import TritonServer

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
MODEL = "slow_echo"
SLOW_S = 4.0  # the slow work the stale request queues behind
TIMEOUT_S = 3.0  # the client's deadline: the stale request times out while queued


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    repo = tmp_path_factory.mktemp("slow_repo")
    log_path = tmp_path_factory.mktemp("slow_log") / "executions.jsonl"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "slow_echo_model.py", repo / MODEL / "1" / "model.py")
    cfg = mc.ModelConfig(name=MODEL, backend="python", max_batch_size=8)
    cfg.input.add(name="pixel_values", data_type=mc.TYPE_FP32, dims=[3, 2, 2])
    cfg.output.add(name="embeddings", data_type=mc.TYPE_FP32, dims=[12])
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    cfg.parameters["log_path"].string_value = str(log_path)
    (repo / MODEL / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("logs") / "slow_server.log") as server:
        yield server, log_path


def _data(rng, tag: int, n: int, delay_s: float = 0.0) -> np.ndarray:
    """`n` random CHW tensors carrying `tag` in [:, 1, 0, 0] and the sleep in [:, 0, 0, 0]."""
    x = rng.random((n, 3, 2, 2), dtype=np.float32)
    x[:, 1, 0, 0] = tag
    x[:, 0, 0, 0] = delay_s
    return x


def _executions(log_path: Path) -> list[list[float]]:
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def _our_regions(url: str) -> set[str]:
    import tritonclient.grpc as grpcclient

    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return {name for name in status.get("regions", {}) if name.startswith("vitserve_")}


@pytest.mark.parametrize("protocol,how", [("grpc", "timeout"), ("http", "timeout"), ("grpc", "cancel")])
def test_a_slot_is_not_reused_while_its_request_is_queued(slow_server, protocol, how):
    server, log_path = slow_server
    url = server.grpc_url if protocol == "grpc" else server.http_url
    rng = np.random.default_rng(0)
    log_path.write_text("")

    async def run() -> tuple[list[tuple[np.ndarray, np.ndarray]], set[str]]:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as grpc_aio

        other = grpc_aio.InferenceServerClient(server.grpc_url)  # another user's slow work
        slow = _data(rng, -1, 1, SLOW_S)
        inp = grpcclient.InferInput("pixel_values", list(slow.shape), "FP32")
        inp.set_data_from_numpy(slow)
        async with AsyncVitClient(
            url, MODEL, protocol=protocol, backbone=MODEL, shared_memory="system", max_in_flight=1,
            batch_size=8, timeout_s=TIMEOUT_S, retries=0,
        ) as client:  # fmt: skip
            warm = _data(rng, 0, 2)
            np.testing.assert_array_equal((await client.embed(warm)).embeddings, warm.reshape(2, -1))
            regions = _our_regions(server.grpc_url)
            assert len(regions) == 2  # one slot: input and output region
            busy = asyncio.ensure_future(other.infer(MODEL, [inp]))
            await asyncio.sleep(0.3)  # the slow request is running; the next one queues behind it
            stale = client.embed(_data(rng, 1, 8))
            t0 = time.monotonic()
            if how == "timeout":
                with pytest.raises(ClientError, match=f"did not answer within {TIMEOUT_S:g} s"):
                    await stale
            else:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(stale, 2.0)
            assert time.monotonic() - t0 < SLOW_S - 0.3  # it ended while queued, before the slow work
            answers = []
            for tag, n in enumerate([1, 3, 8, 2, 5, 8], start=2):
                x = _data(rng, tag, n)
                answers.append((x, (await client.embed(x, strict=True)).embeddings))
            await busy
            regions |= _our_regions(server.grpc_url)
        await other.close()
        return answers, regions

    answers, regions = asyncio.run(run())
    for x, got in answers:
        np.testing.assert_array_equal(got, x.reshape(len(x), -1))
    executions = _executions(log_path)
    mixed = [tags for tags in executions if len(tags) != 1]
    assert not mixed, f"the server computed a request on another request's input: {mixed}"
    assert [t[0] for t in executions if t[0] >= 2] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    # the retired slot's regions and their replacements are all gone from the server and /dev/shm
    assert len(regions) == 4
    assert not (_our_regions(server.grpc_url) & regions)
    assert not [r for r in regions if Path("/dev/shm", r).exists()]
