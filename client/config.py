"""The client's settings, checked at the door."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vitserve.apikey import check_key, read_key
from vitserve.client.shm import SharedMemory
from vitserve.errors import ConfigError, enum_value


class Protocol(StrEnum):
    GRPC = "grpc"
    HTTP = "http"


DEFAULT_PORTS = {Protocol.GRPC: 8001, Protocol.HTTP: 8000}
TLS_SCHEMES = ("https", "grpcs")
# gRPC name-resolver targets naming several servers (`dns:///pods-service:8001` for a headless Kubernetes
# Service, `ipv4:10.0.0.1:8001,10.0.0.2:8001`): the channel balances each request over all of them (round_robin)
GRPC_RESOLVERS = ("dns:", "ipv4:", "ipv6:")


def is_resolver_target(url: str) -> bool:
    """Whether `url` is a gRPC name-resolver target (several servers, balanced per request)."""
    return url.lower().startswith(GRPC_RESOLVERS)


def normalize_url(url: str | None, protocol: Protocol) -> str:
    """`host:port` as tritonclient wants it: no scheme, no trailing slash, the protocol's port by default."""
    if not url:
        return f"localhost:{DEFAULT_PORTS[protocol]}"
    url = str(url).strip()
    if is_resolver_target(url):
        if protocol is not Protocol.GRPC:
            raise ConfigError(
                f"url {url}: a gRPC name-resolver target (dns:, ipv4:, ipv6:) needs protocol 'grpc'"
            )
        return url
    if "://" in url:
        scheme, url = url.split("://", 1)
        if scheme.lower() not in TLS_SCHEMES and scheme.lower() not in ("http", "grpc"):
            raise ConfigError(
                f"url {scheme}://{url}: only http://, grpc:// or, with TLS, https:// and grpcs:// endpoints "
                "(host:port) are supported"
            )
    url = url.rstrip("/")
    if "/" in url or not url:
        raise ConfigError(f"url {url!r} must be host:port (no path)")
    has_port = url.rsplit("]", 1)[-1].count(":") == 1 if url.startswith("[") else url.count(":") == 1
    return url if has_port else f"{url}:{DEFAULT_PORTS[protocol]}"


@dataclass
class ClientConfig:
    """Settings of VitClient/AsyncVitClient; a bad value is refused with the value in the message.

    `batch_size` images go in one request (lowered to the model's max_batch_size; one per request for a
    DALI ensemble, whose `image` is UINT8 [-1]), at most `max_in_flight`
    requests are outstanding at once, every call to the server ends after `timeout_s`, and a request that
    could not reach the server is tried `retries` more times with exponential backoff from `backoff_s`.
    `api_key` goes with every call in the header the server's restricted APIs check (vitserve/apikey.py);
    None reads `$VITSERVE_API_KEY` or the key file, "" sends none. `tls` (or an https:// / grpcs:// url)
    speaks TLS, trusting `ca_file` (PEM) or the system's CAs. A gRPC name-resolver target as `url`
    (`dns:///vitserve-triton-pods:8001`, `ipv4:HOST:PORT,HOST:PORT`) spreads the requests over every server it
    names, one by one (gRPC's round_robin), where one host:port keeps one connection to one server."""

    url: str | None
    model: str = "vitb32"
    protocol: Protocol | str = Protocol.GRPC
    backbone: str | None = None
    batch_size: int = 8
    max_in_flight: int = 4
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.2
    shared_memory: SharedMemory | str = SharedMemory.NONE
    cuda_device: int = 0
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None

    def __post_init__(self) -> None:
        self.protocol = enum_value(Protocol, self.protocol, "protocol")
        self.shared_memory = enum_value(SharedMemory, self.shared_memory, "shared_memory")
        if self.url and str(self.url).strip().lower().startswith(tuple(s + "://" for s in TLS_SCHEMES)):
            self.tls = True
        self.url = normalize_url(self.url, self.protocol)
        self.api_key = (
            read_key() if self.api_key is None else (check_key(self.api_key) if self.api_key else "")
        )
        if self.ca_file is not None:
            self.tls = True
            if not Path(self.ca_file).is_file():
                raise ConfigError(f"ca_file {self.ca_file!r} is not a file (a PEM bundle of trusted CAs)")
        if not self.model or not isinstance(self.model, str):
            raise ConfigError(f"model {self.model!r} must be a model name, e.g. 'vitb32'")
        for name in ("batch_size", "max_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} {value!r} must be an integer >= 1")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries {self.retries!r} must be an integer >= 0")
        for name in ("timeout_s", "backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} {value!r} must be a number of seconds > 0")
        if self.cuda_device < 0:
            raise ConfigError(f"cuda_device {self.cuda_device!r} must be >= 0")
