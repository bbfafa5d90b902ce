"""Shared-memory regions for tensor inputs and outputs (system /dev/shm, or CUDA IPC when a GPU is there).

Each in-flight request owns a slot: one region per tensor it moves through shared memory, sized for a full
request. A region is made here and destroyed here; registering it with the server is the client's job.
Shared memory only works when client and server share the host (and, for system memory, /dev/shm).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class SharedMemory(StrEnum):
    NONE = "none"
    SYSTEM = "system"
    CUDA = "cuda"


def host_of(url: str) -> str:
    """The host of `host:port`, `[v6]:port` or `scheme://host:port`."""
    url = url.split("://", 1)[-1].split("/", 1)[0]
    if url.startswith("["):
        return url[1 : url.index("]")]
    return url.rsplit(":", 1)[0] if url.count(":") == 1 else url


def is_local(url: str) -> bool:
    """Whether `url` (host:port) names this machine, the only case where shared memory can work."""
    host = host_of(url)
    if host in ("localhost", "", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


@dataclass
class Region:
    """One shared-memory region: `name` is how the server knows it, `handle` how this process reaches it
    (a multiprocessing SharedMemory for system regions, tritonclient's CUDA handle for CUDA regions)."""

    kind: SharedMemory
    name: str
    byte_size: int
    handle: Any
    key: str = ""  # system regions: the POSIX shm key the server opens
    device_id: int = 0

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.byte_size:
            raise ValueError(f"{array.nbytes} bytes do not fit region {self.name} of {self.byte_size}")
        if self.kind is SharedMemory.CUDA:
            self._cuda().set_shared_memory_region(self.handle, [array])
            return
        np.frombuffer(self.handle.buf, np.uint8, array.nbytes)[:] = array.reshape(-1).view(np.uint8)

    def read(self, dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the region's first `prod(shape)` values (the region is reused by the next request)."""
        if self.kind is SharedMemory.CUDA:
            return np.array(self._cuda().get_contents_as_numpy(self.handle, dtype, shape), copy=True)
        count = int(np.prod(shape))
        return np.frombuffer(self.handle.buf, dtype, count).reshape(shape).copy()

    def raw_handle(self) -> Any:
        return self._cuda().get_raw_handle(self.handle)

    def destroy(self) -> None:
        if self.kind is SharedMemory.CUDA:
            self._cuda().destroy_shared_memory_region(self.handle)
            return
        self.handle.close()
        with contextlib.suppress(FileNotFoundError):
            self.handle.unlink()

    @staticmethod
    def _cuda():
        import tritonclient.utils.cuda_shared_memory as cudashm

        return cudashm


@dataclass
class Slot:
    """The regions one in-flight request uses, by tensor name (empty without shared memory)."""

    regions: dict[str, Region] = field(default_factory=dict)


def new_name(prefix: str = "vitserve") -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"


def create(kind: SharedMemory, name: str, byte_size: int, device_id: int = 0) -> Region:
    """Create (locally) one region; raises on any failure, leaving nothing behind.

    System regions use the standard library's POSIX shared memory rather than
    tritonclient.utils.shared_memory, which imports pkg_resources (gone from setuptools >= 81); its
    resource tracker also unlinks them should this process die without closing the client."""
    if kind is SharedMemory.CUDA:
        handle = Region._cuda().create_shared_memory_region(name, byte_size, device_id)
        return Region(kind, name, byte_size, handle, device_id=device_id)
    from multiprocessing import shared_memory

    handle = shared_memory.SharedMemory(name=name, create=True, size=byte_size)
    return Region(kind, name, byte_size, handle, key="/" + handle.name)


def destroy_all(regions: list[Region]) -> None:
    """Destroy local regions, logging (not raising) what cannot be destroyed; used by close and finalizers."""
    while regions:
        region = regions.pop()
        try:
            region.destroy()
        except Exception as e:
            log.warning("could not destroy shared-memory region %s: %s", region.name, e)


def cuda_available(device_id: int) -> str | None:
    """None when CUDA shared memory can be made on `device_id`, else why not."""
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm
    except Exception as e:  # the module needs cuda-python; its absence is the usual CPU-host case
        return f"tritonclient's CUDA shared memory is unavailable ({type(e).__name__}: {e})"
    with contextlib.suppress(Exception):
        probe = cudashm.create_shared_memory_region(new_name("vitserve_probe"), 64, device_id)
        cudashm.destroy_shared_memory_region(probe)
        return None
    return f"no CUDA device {device_id} could allocate shared memory"
