"""The key that guards tritonserver's control APIs: its header, its environment variable, where it lives.

tritonserver 2.51 restricts APIs per protocol (`--http-restricted-api` / `--grpc-restricted-protocol`,
value `APIS:HEADER=VALUE`): a restricted call must carry HEADER=VALUE, anything else is refused (HTTP 403;
gRPC UNAVAILABLE "This protocol is restricted"). Over gRPC the server expects the header with Triton's
prefix `triton-grpc-protocol-`. vitserve restricts the control APIs (load/unload models, shared memory,
statistics, trace and log settings) and leaves inference, health and metadata open.

The key is the operator's: `$VITSERVE_API_KEY`, else the key file (`$XDG_CONFIG_HOME/vitserve/api_key`,
made with a random key and mode 0600 the first time a server needs one). Clients on the same host and
account read it the same way; elsewhere set `VITSERVE_API_KEY`. Imported by the server launcher, the client
and the deploy manifests' tests: one owner for these names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from vitserve.errors import ConfigError

API_KEY_ENV = "VITSERVE_API_KEY"
API_KEY_HEADER = "vitserve-api-key"  # lower case: gRPC metadata keys are
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # tritonserver reads a restricted gRPC protocol's key so
GRPC_API_KEY_HEADER = GRPC_HEADER_PREFIX + API_KEY_HEADER
# Behind the key by default; the rest (health, metadata, inference, model-config) stays open.
CONTROL_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
# The bearer key of `vitserve api` (the OpenAI-compatible endpoint; clients send `Authorization: Bearer KEY`):
# a key of its own, for the API's users, never the operator's control key above.
EMBEDDINGS_KEY_ENV = "VITSERVE_EMBEDDINGS_KEY"
EMBEDDINGS_KEY_FILE = "embeddings_api_key"
# Every API tritonserver 2.51 can restrict (its --help): a name outside it is refused at the door.
KNOWN_APIS = (
    "health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics", "trace",
    "logging",
)  # fmt: skip


def key_file(name: str = "api_key") -> Path:
    """Where a generated key is kept (readable by its owner only)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "vitserve" / name


def check_key(key: str, env: str = API_KEY_ENV, name: str = "api_key") -> str:
    """`key` if it can travel in a header and on tritonserver's command line; ConfigError otherwise."""
    if not key or not all(c.isascii() and (c.isalnum() or c in "-_.~") for c in key):
        raise ConfigError(
            f"API key from ${env} or {key_file(name)} must be non-empty and use only letters, digits "
            "and -_.~ (it travels in a header); e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return key


def read_key(env: str = API_KEY_ENV, name: str = "api_key") -> str | None:
    """The operator's key: `$VITSERVE_API_KEY`, else the key file's; None when neither is set. (`env`,
    `name`: another key kept the same way, e.g. EMBEDDINGS_KEY_ENV / EMBEDDINGS_KEY_FILE.)"""
    key = os.environ.get(env)
    if key is None:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            key = key_file(name).read_text().strip()
    return None if key is None else check_key(key, env, name)


def server_key(env: str = API_KEY_ENV, name: str = "api_key") -> tuple[str, str]:
    """(key, where it came from) for a server: the operator's key, or a new random one written to the key
    file with mode 0600 (created exclusively: two servers starting at once end with the same key)."""
    key = read_key(env, name)
    if key is not None:
        return key, f"${env}" if env in os.environ else str(key_file(name))
    path = key_file(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return check_key(path.read_text().strip(), env, name), str(path)
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, str(path)


def headers(key: str | None, grpc: bool) -> dict[str, str]:
    """The header carrying `key` over gRPC or HTTP ({} without a key), for tritonclient's `headers=`."""
    if not key:
        return {}
    return {GRPC_API_KEY_HEADER if grpc else API_KEY_HEADER: key}


def check_apis(apis: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`apis` as tritonserver names them; ConfigError naming an unknown one and the known ones."""
    bad = [a for a in apis if a not in KNOWN_APIS]
    if bad:
        raise ConfigError(f"unknown tritonserver API {bad[0]!r}; known: {', '.join(KNOWN_APIS)}")
    return tuple(apis)


def restricted_args(apis: tuple[str, ...], key: str) -> list[str]:
    """tritonserver flags that put `apis` behind `key` on HTTP and gRPC ([] when `apis` is empty)."""
    if not apis:
        return []
    value = f"{','.join(apis)}:{API_KEY_HEADER}={check_key(key)}"
    return [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}"]
