"""The slots of one model: at most `max_in_flight` requests outstanding, each with its own shared memory.

A slot holds one region per tensor that moves through shared memory (sized for a full request); without
shared memory it is empty and only bounds the requests in flight. The server reads a request's input
region when the request runs and writes its output region when it answers, not when the client sends it,
so a slot goes back to the pool only once the server has answered the request that used it. A request
that timed out, was cancelled or lost its connection may still be queued or running on the server: had
its slot gone to the next request, the stale request would compute on that request's input and write into
its output region. Such a slot is retired instead: its regions are unregistered as soon as the server
lets go of them (Triton refuses to unregister a region a request still holds, "in use", and tritonserver
2.51 holds it from arrival to answer), destroyed, and replaced by new regions under new names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vitserve.client import shm
from vitserve.client.shm import SharedMemory
from vitserve.client.transport import RETRY, TIMEOUT, error_kind, error_text
from vitserve.errors import ClientError

log = logging.getLogger(__name__)

UNREGISTER_WAIT_S = 5.0  # how long close() waits for the server to let go of a region
RETIRE_POLL_S = (0.02, 0.2)  # first and longest pause between attempts to unregister a retired region


def _methods(region: shm.Region) -> tuple[str, str]:
    if region.kind is SharedMemory.CUDA:
        return "register_cuda_shared_memory", "unregister_cuda_shared_memory"
    return "register_system_shared_memory", "unregister_system_shared_memory"


class SlotPool:
    """The slots one model's requests take and give back (see the module docstring).

    `call(method, *args, timeout_s=None)` is the client's call to the server; `owned` is the client's
    list of every local region, which its finalizer destroys should the client never be closed."""

    def __init__(
        self,
        kind: SharedMemory,
        sizes: dict[str, int],
        count: int,
        call: Callable[..., Awaitable[Any]],
        owned: list[shm.Region],
        *,
        device_id: int = 0,
        timeout_s: float = 30.0,
        where: str = "the server",
    ) -> None:
        self.kind = kind if sizes else SharedMemory.NONE
        self.sizes = sizes if self.kind is not SharedMemory.NONE else {}
        self.count = count
        self._call = call
        self._owned = owned
        self._device_id = device_id
        self._timeout_s = timeout_s
        self._where = where
        self._free: asyncio.Queue[shm.Slot] = asyncio.Queue()
        self._registered: list[shm.Region] = []
        self._retiring: set[asyncio.Task] = set()
        self._in_use = 0
        self._retire_error = ""  # why the last retired region could not be unregistered yet
        self._closed = False

    @property
    def retiring(self) -> int:
        """How many slots wait for the server to answer a request it was not seen to answer."""
        return len(self._retiring)

    def regions(self) -> list[shm.Region]:
        """The regions registered with the server now (slots free, in use and retiring)."""
        return list(self._registered)

    # -- making and destroying regions ----------------------------------------------------------------

    async def fill(self) -> None:
        """Make the pool's `count` slots; raises (leaving nothing registered) when shared memory fails."""
        made: list[shm.Slot] = []
        try:
            for _ in range(self.count):
                made.append(await self._new_slot())
        except BaseException:
            for slot in made:
                await self._drop(slot, wait_s=0.0)
            raise
        for slot in made:
            self._free.put_nowait(slot)

    async def _new_slot(self) -> shm.Slot:
        slot = shm.Slot()
        try:
            for tensor, size in self.sizes.items():
                region = shm.create(self.kind, shm.new_name(), size, self._device_id)
                self._owned.append(region)
                slot.regions[tensor] = region
                await self._register(region)
        except BaseException:
            await self._drop(slot, wait_s=0.0)
            raise
        return slot

    async def _register(self, region: shm.Region) -> None:
        method = _methods(region)[0]
        if region.kind is SharedMemory.CUDA:
            await self._call(method, region.name, region.raw_handle(), region.device_id, region.byte_size)
        else:
            await self._call(method, region.name, region.key, region.byte_size)
        self._registered.append(region)

    async def _unregister(self, region: shm.Region) -> str | None:
        """Unregister `region`: None when done (or the server never knew it), else why not ("in use":
        a request still holds it)."""
        if region not in self._registered:
            return None
        try:
            await self._call(_methods(region)[1], region.name, timeout_s=min(self._timeout_s, 5.0))
        except Exception as e:
            return error_text(e)
        self._registered.remove(region)
        return None

    async def _drop(self, slot: shm.Slot, wait_s: float) -> None:
        """Unregister (waiting up to `wait_s` while the server still holds a region) and destroy."""
        deadline = time.monotonic() + wait_s
        for region in slot.regions.values():
            while (why := await self._unregister(region)) is not None:
                if "in use" in why and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                log.warning(
                    "could not unregister shared-memory region %s from %s: %s", region.name, self._where, why
                )
                with contextlib.suppress(ValueError):
                    self._registered.remove(region)
                break
            if region in self._owned:
                self._owned.remove(region)
            shm.destroy_all([region])
        slot.regions.clear()

    # -- taking and giving back -----------------------------------------------------------------------

    async def acquire(self) -> shm.Slot:
        """A free slot, waiting for one. Waiting is unbounded while requests of this client are running
        (each ends by its own deadline and gives its slot back); a ClientError when every slot has been held
        back for unanswered requests for longer than the client's timeout."""
        getter = asyncio.ensure_future(self._free.get())
        taken = False
        try:
            while True:
                if self._closed:
                    raise ClientError("the client is closed; make a new one")
                done, _ = await asyncio.wait({getter}, timeout=self._timeout_s)
                if done:
                    taken = True
                    self._in_use += 1
                    return getter.result()
                if self.retiring and not self._in_use:  # no request of ours will give a slot back
                    why = (
                        f" (last answer to unregistering: {self._retire_error})" if self._retire_error else ""
                    )
                    raise ClientError(
                        f"no request slot came free within {self._timeout_s:g} s: {self.retiring} of "
                        f"{self.count} are held back until {self._where} has answered requests that timed "
                        f"out, were cancelled or lost their connection{why}; their shared memory cannot be "
                        "reused before. Check that the server is up and its load, or raise timeout_s"
                    )
        finally:
            if not taken:  # raised or cancelled: a slot the getter took meanwhile goes back
                if getter.done() and not getter.cancelled():
                    self._free.put_nowait(getter.result())
                else:
                    getter.cancel()

    def release(self, slot: shm.Slot, answered: bool) -> None:
        """Give `slot` back: at once when the server `answered` its request (or it was never sent) or the
        slot has no shared memory, else after the server has let go of its regions (see the module)."""
        self._in_use -= 1
        if answered or not slot.regions or self._closed:
            self._free.put_nowait(slot)
            return
        task = asyncio.ensure_future(self._retire(slot))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, slot: shm.Slot) -> None:
        names = ", ".join(r.name for r in slot.regions.values())
        log.debug("shared-memory slot %s retired until %s lets go of it", names, self._where)
        pause = RETIRE_POLL_S[0]
        try:
            for region in list(slot.regions.values()):
                while (why := await self._unregister(region)) is not None:
                    # "in use": the stale request is still queued or running. Anything else (the server
                    # is unreachable, say) is tried again: a restarted server no longer knows the region.
                    self._retire_error = why
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, RETIRE_POLL_S[1])
                    log.debug("region %s not unregistered yet: %s", region.name, why)
            await self._drop(slot, wait_s=0.0)  # nothing left registered: destroy the local memory
            while True:
                try:
                    fresh = await self._new_slot()
                    break
                except Exception as e:
                    if error_kind(e) not in (RETRY, TIMEOUT):
                        raise
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, RETIRE_POLL_S[1])
            self._free.put_nowait(fresh)
        except asyncio.CancelledError:  # close(): it releases what is left
            self._free.put_nowait(slot)
            raise
        except Exception as e:  # the request count stays bounded; this slot's tensors go by network
            log.warning(
                "a retired shared-memory slot could not be replaced (%s); its requests go over the network",
                error_text(e),
            )
            self._free.put_nowait(shm.Slot())

    async def close(self) -> None:
        """Unregister and destroy every region, waiting briefly for the server to let go of each."""
        self._closed = True
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        slots = []
        while not self._free.empty():
            slots.append(self._free.get_nowait())
        leftover = shm.Slot({f"r{i}": r for i, r in enumerate(self._registered)})
        for slot in [*slots, leftover]:
            await self._drop(slot, wait_s=min(self._timeout_s, UNREGISTER_WAIT_S))
