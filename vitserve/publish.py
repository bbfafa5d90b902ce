"""A built Triton model repository -> S3-compatible object storage, atomically for readers.

    publish("model_repository", "s3://models/vitserve")      # -> Published(version, triton_url, ...)
    current("s3://models/vitserve").triton_url               # what tritonserver --model-repository gets

Layout under `s3://BUCKET/PREFIX` (S3 has no rename, so a version is never written in place):

    PREFIX/versions/VERSION/.vitserve-claim        create-only, held while the version uploads: one publish
                                                   per version (so its cleanup only deletes its own files)
    PREFIX/versions/VERSION/...                    one whole copy of the repository per publish, never changed
    PREFIX/versions/VERSION/vitserve-publish.json  written after every file of the version is uploaded and
                                                   checked (key and size listed back): the version is complete
    PREFIX/CURRENT                                 {"version": VERSION, ...}: the pointer, written last

A reader resolves CURRENT to `PREFIX/versions/VERSION/` and gives tritonserver that fixed prefix
(`--model-repository=s3://...`, see `triton_url`). One PUT replaces CURRENT whole (S3 objects are never
seen half-written), so a reader sees the old version or the new one, never a mixture; an upload that fails
or is interrupted never reaches the pointer, so the old version keeps serving (the partial upload is deleted
by listing the version's prefix, so an object that landed although its upload reported a failure goes too;
a leftover one is never pointed at). Old versions are kept: a replica that restarts with a pinned version
(the Kubernetes manifests pin one, so all replicas of a Deployment serve the same model) must still find it.

CURRENT only moves forward: a publish reads CURRENT's ETag before it uploads and replaces it with an S3
conditional write (`If-Match` that ETag, or `If-None-Match: *` when there was none). If another publish
moved CURRENT meanwhile, the slower one is refused (its version stays uploaded, not current) instead of
putting an older repository back (last writer wins). AWS S3 has conditional writes since 2024, as MinIO
and moto do; storage that ignores the headers falls back to last writer wins.

Only what can serve is published: a repository whose manifest has a TensorRT model without a verified
plan (only build.sh, a plan that failed or skipped verification, or a plan that is not the recorded one)
is refused unless `force=True` (`unservable_plans`). `check_published_engines` is `vitserve check-engines`
for an s3:// repository: every plan the published manifest lists, against this host, without downloading.

Endpoint, region and credentials come the standard AWS way (environment, ~/.aws, instance role);
`endpoint_url` (or AWS_ENDPOINT_URL) selects S3-compatible storage (MinIO, Ceph, moto).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vitserve.errors import VitServeError, missing_extra

log = logging.getLogger(__name__)

POINTER = "CURRENT"
RECORD = "vitserve-publish.json"
CLAIM = ".vitserve-claim"  # written create-only before a version's upload: who publishes it
VERSIONS = "versions"
# S3's answers to a conditional PUT of CURRENT that another publish got to first: 412 (it is not the
# object this publish saw), 404 (If-Match on a pointer deleted meanwhile), 409 (a concurrent conditional
# write to the same key).
POINTER_MOVED = frozenset(
    {"PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"}
)


class PublishError(VitServeError):
    """A repository could not be published to, or resolved from, object storage."""


@dataclass(frozen=True)
class S3Location:
    """`s3://BUCKET/PREFIX`, checked at the door (PREFIX without leading or trailing slashes)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parsed = urlparse(str(url))
        if parsed.scheme != "s3" or not parsed.netloc:
            raise PublishError(f"{url!r} is not an S3 location; write it as s3://BUCKET/PREFIX")
        prefix = parsed.path.strip("/")
        if not prefix:
            raise PublishError(
                f"{url!r} has no prefix; publish under one (s3://{parsed.netloc}/vitserve) so that its "
                f"{VERSIONS}/ and {POINTER} do not mix with the rest of the bucket"
            )
        if any(part in ("", ".", "..") for part in prefix.split("/")):
            raise PublishError(f"{url!r}: the prefix {prefix!r} has an empty, '.' or '..' component")
        return cls(parsed.netloc, prefix)

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def triton_url(bucket: str, key_prefix: str, endpoint_url: str | None = None) -> str:
    """tritonserver's `--model-repository` for an S3 prefix: `s3://BUCKET/KEY` on AWS, and for other
    S3-compatible storage the endpoint between `s3://` and the bucket (`s3://http://host:port/BUCKET/KEY`,
    the form Triton's S3 filesystem parses)."""
    key_prefix = key_prefix.strip("/")
    if not endpoint_url:
        return f"s3://{bucket}/{key_prefix}"
    return f"s3://{endpoint_url.rstrip('/')}/{bucket}/{key_prefix}"


@dataclass(frozen=True)
class Published:
    """One published version: where it is, and the URL tritonserver loads it from."""

    location: S3Location
    version: str
    files: int
    bytes: int
    triton_url: str

    @property
    def version_url(self) -> str:
        return f"{self.location}/{VERSIONS}/{self.version}"


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client configured the standard AWS way; `endpoint_url` for S3-compatible storage."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise missing_extra("boto3", "cluster") from e
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # path-style addressing: S3-compatible servers on host:port (MinIO, moto) have no per-bucket host names
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _endpoint(client) -> str | None:
    """The endpoint the client talks to, or None for AWS itself (what tritonserver needs to know)."""
    url = client.meta.endpoint_url
    return None if urlparse(url).hostname.endswith("amazonaws.com") else url


def _translate(e: Exception, doing: str, location: S3Location) -> PublishError:
    """A boto3/botocore failure as an error that names the location and what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return PublishError(
            f"no AWS credentials while {doing} {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or an instance role)"
        )
    if isinstance(e, EndpointConnectionError):
        return PublishError(
            f"cannot reach the S3 endpoint while {doing} {location} ({e}); check --endpoint-url / "
            "AWS_ENDPOINT_URL and that the storage is running"
        )
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404") and "bucket" in doing:
            return PublishError(f"bucket {location.bucket!r} does not exist; create it first ({e})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PublishError(f"access denied while {doing} {location}: check the credentials ({code})")
        return PublishError(f"S3 refused {doing} {location}: {code or e}")
    return PublishError(f"{doing} {location} failed: {e}")


def repository_files(repository: str | Path) -> list[tuple[str, Path]]:
    """(relative key, path) of every file of a built repository (no __pycache__), sorted; refuses what is
    not one. An empty
    folder (an ensemble's version folder `NAME/1/`) is listed as `NAME/1/`: S3 has no folders, and without
    a marker object tritonserver finds no version of that model."""
    root = Path(repository)
    if not root.is_dir():
        raise PublishError(f"model repository {str(root)!r} does not exist; build it with `make engines`")
    files = sorted(
        (p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""), p)
        for p in root.rglob("*")
        if (p.is_file() or (p.is_dir() and not any(p.iterdir())))
        # hidden files and the bytecode a python-backend stub leaves when a repository has been served
        # (Python-version specific: the serving image compiles its own)
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)
    )
    if not any(rel.count("/") == 1 and rel.endswith("/config.pbtxt") for rel, _ in files):
        raise PublishError(
            f"{str(root)!r} holds no model (no NAME/config.pbtxt); build the repository with `make engines`"
        )
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list(client, bucket: str, prefix: str) -> dict[str, int]:
    """{key: size} of every object under `prefix`."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["Size"]
    return out


def _delete(client, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        )


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _pointer(client, location: S3Location) -> tuple[str | None, str | None]:
    """(ETag, version) of CURRENT now, or (None, None) when nothing is published yet: the swap is
    conditional on that ETag."""
    try:
        obj = client.get_object(Bucket=location.bucket, Key=location.key(POINTER))
    except Exception as e:
        if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return None, None
        raise _translate(e, "reading the pointer of", location) from e
    try:
        version = json.loads(obj["Body"].read()).get("version")
    except (ValueError, AttributeError):
        version = None
    return obj["ETag"], version


# ----------------------------------------------------------------------------------------- only what serves


def _manifest_engines(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Triton model name -> its engine record, over every model of a vitserve-manifest.json."""
    records: dict[str, dict[str, Any]] = {}
    for model in (manifest.get("models") or {}).values():
        records.update(model.get("engines") or {})
    return records


def unservable_plans(repository: str | Path, files: list[tuple[str, Path]] | None = None) -> list[str]:
    """Why the TensorRT models among `files` (default: all of `repository`) cannot be trusted to serve:
    a model with only build.sh (no plan), a plan whose verification did not pass its gate (or never
    ran), a plan not recorded in vitserve-manifest.json or not the recorded one (sha256). Empty when every
    plan is built and verified. A TensorRT model is one the manifest has an engine record for, or a folder
    with `1/model.plan` or `1/build.sh`."""
    from vitserve.exporter.repository import REPOSITORY_MANIFEST

    root = Path(repository)
    files = repository_files(root) if files is None else files
    present = {rel.split("/", 1)[0] for rel, _ in files if "/" in rel}
    by_rel = dict(files)
    manifest_path = root / REPOSITORY_MANIFEST
    records = _manifest_engines(json.loads(manifest_path.read_text())) if manifest_path.is_file() else {}
    names = {n for n in records if n in present} | {
        rel.split("/", 1)[0] for rel, _ in files if rel.endswith(("/1/model.plan", "/1/build.sh"))
    }
    rebuild = "build and verify it on the GPU host (`make engines-gpu`)"
    problems = []
    for name in sorted(names):
        rec, plan = records.get(name), by_rel.get(f"{name}/1/model.plan")
        if rec is None:
            what = "its plan" if plan else "it"
            problems.append(f"{name}: {what} is not recorded in {manifest_path}; {rebuild}")
        elif plan is None or not rec.get("built", True):
            problems.append(f"{name}: no plan, only {rec.get('build_script') or 'build.sh'}; {rebuild}")
        elif not (rec.get("fidelity") or {}).get("passed", False):
            gate = (rec.get("fidelity") or {}).get("gate") or "never verified"
            problems.append(f"{name}: its plan did not pass verification ({gate}); {rebuild}")
        elif rec.get("plan_sha256") and rec["plan_sha256"] != _sha256(plan):
            problems.append(
                f"{name}: {plan} is not the plan the manifest recorded (sha256 differs); {rebuild}"
            )
    return problems


def check_published_engines(
    url: str, host: dict[str, Any] | None = None, *, client: Any = None
) -> tuple[int, list[str]]:
    """`vitserve check-engines` for an s3:// repository (tritonserver's `--model-repository`, either
    `s3://BUCKET/PREFIX` or `s3://http(s)://HOST:PORT/BUCKET/PREFIX`): every `NAME/1/model.plan` under the
    prefix against the published vitserve-manifest.json (recorded, and the file the publish record lists
    is the recorded plan) and against `host` (default: this host's TensorRT and GPU). Nothing is
    downloaded but the two JSON files. Returns (plans found, problems)."""
    from vitserve.exporter.engine import host_provenance, provenance_problems
    from vitserve.exporter.repository import REPOSITORY_MANIFEST

    endpoint, location = parse_triton_url(url)
    client = client or s3_client(endpoint)
    root = location.prefix + "/"
    try:
        keys = _list(client, location.bucket, root)
    except Exception as e:
        raise _translate(e, "listing", location) from e
    plans = sorted(
        k[len(root) :].split("/", 1)[0]
        for k in keys
        if re.fullmatch(re.escape(root) + r"[^/]+/1/model\.plan", k)
    )
    if not plans:
        return 0, []

    def read_json(name: str) -> dict[str, Any] | None:
        try:
            return json.loads(client.get_object(Bucket=location.bucket, Key=root + name)["Body"].read())
        except Exception as e:
            if _error_code(e) in ("404", "NoSuchKey"):
                return None
            raise _translate(e, f"reading {name} of", location) from e

    manifest = read_json(REPOSITORY_MANIFEST)
    if manifest is None:
        return len(plans), [f"{url}: has TensorRT plans but no {REPOSITORY_MANIFEST} to check them against"]
    record = read_json(RECORD) or {}
    published_sha = {f["key"]: f.get("sha256") for f in record.get("files", [])}
    records = _manifest_engines(manifest)
    host = host_provenance() if host is None else host
    problems = []
    for name in plans:
        rec = records.get(name)
        if not rec or not rec.get("built", True):
            problems.append(
                f"{name}: {url}/{name}/1/model.plan is not recorded in {REPOSITORY_MANIFEST}; rebuild with `make engines-gpu`"
            )
            continue
        sha = published_sha.get(f"{name}/1/model.plan")
        if sha and rec.get("plan_sha256") and sha != rec["plan_sha256"]:
            problems.append(
                f"{name}: the published plan is not the one {REPOSITORY_MANIFEST} records (sha256 differs); rebuild with `make engines-gpu` and publish again"
            )
            continue
        problems += provenance_problems(name, rec, host)
    return len(plans), problems


def parse_triton_url(url: str) -> tuple[str | None, S3Location]:
    """tritonserver's S3 `--model-repository` -> (endpoint URL or None for AWS, location): the inverse of
    `triton_url`. Triton reads `s3://[http(s)://]HOST:PORT/BUCKET/PATH` as an endpoint (no scheme: http)."""
    m = re.fullmatch(r"s3://(?:(https?://)?([0-9A-Za-z.\-]+:[0-9]+)/)?(.+)", str(url).strip())
    if not m:
        raise PublishError(f"{url!r} is not an S3 model repository; write it as s3://BUCKET/PREFIX")
    scheme, hostport, rest = m.groups()
    endpoint = f"{scheme or 'http://'}{hostport}" if hostport else None
    return endpoint, S3Location.parse(f"s3://{rest}")


def publish(
    repository: str | Path,
    to: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    client: Any = None,
    version: str | None = None,
    models: list[str] | None = None,
    force: bool = False,
    upload_hook: Any = None,
) -> Published:
    """Upload `repository` as a new version under `to` (s3://BUCKET/PREFIX) and point CURRENT at it
    (see the module docstring for the layout, why readers never see a partial version and why a slower
    publish never puts an older version back).

    `version` defaults to the UTC time and a hash of the contents (sortable, unique per content).
    `models` publishes only those model folders (and the root files), e.g. an ensemble and its steps.
    A TensorRT model without a verified plan is refused (`unservable_plans`) unless `force`; a forced
    publish lists them in its record. `upload_hook(key)` is called before each upload (tests use it to
    fail an upload midway, or to let another publish finish first)."""
    location = S3Location.parse(to)
    files = repository_files(repository)
    if models is not None:
        present = {rel.split("/", 1)[0] for rel, _ in files if "/" in rel}
        unknown = sorted(set(models) - present)
        if unknown:
            raise PublishError(
                f"model(s) {', '.join(unknown)} are not in {str(repository)!r} (it has: {', '.join(sorted(present))})"
            )
        files = [(rel, p) for rel, p in files if "/" not in rel or rel.split("/", 1)[0] in models]
    unverified = unservable_plans(repository, files)
    if unverified and not force:
        raise PublishError(
            f"{str(repository)!r} has TensorRT models that cannot be trusted to serve, so nothing was "
            f"published: {'; '.join(unverified)}. Build and verify the plans first, or publish anyway with "
            "--force"
        )
    for problem in unverified:
        log.warning("publishing anyway (force): %s", problem)
    client = client or s3_client(endpoint_url, region)
    try:
        client.head_bucket(Bucket=location.bucket)
    except Exception as e:
        raise _translate(e, "checking the bucket of", location) from e

    records = [
        {"key": rel, "bytes": 0 if p.is_dir() else p.stat().st_size, "sha256": _sha256(p)} for rel, p in files
    ]
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:12]
    version = version or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{digest}"
    if "/" in version or not version.strip("."):
        raise PublishError(f"version {version!r} must be one path component")
    base = location.key(VERSIONS, version)
    exists = PublishError(
        f"{location}/{VERSIONS}/{version} already exists (or is being published); versions are never overwritten"
    )
    if _list(client, location.bucket, base + "/"):
        raise exists
    # Claim the version first (create-only): of two publishes of one version only one gets past here, so
    # the cleanup below, which deletes everything under the version's prefix, only ever deletes its own.
    claim = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        client.put_object(
            Bucket=location.bucket, Key=f"{base}/{CLAIM}", Body=json.dumps(claim).encode(), IfNoneMatch="*"
        )
    except Exception as e:
        if _error_code(e) in POINTER_MOVED:
            raise exists from e
        raise _translate(e, f"claiming version {version} in", location) from e
    if set(_list(client, location.bucket, base + "/")) != {f"{base}/{CLAIM}"}:  # finished before our claim
        client.delete_object(Bucket=location.bucket, Key=f"{base}/{CLAIM}")
        raise exists
    # What CURRENT is before this upload: the pointer swap below only replaces exactly that.
    seen, seen_version = _pointer(client, location)

    try:
        for rel, path in files:
            key = f"{base}/{rel}"
            if upload_hook is not None:
                upload_hook(key)
            if path.is_dir():
                client.put_object(Bucket=location.bucket, Key=key, Body=b"")
            else:
                client.upload_file(str(path), location.bucket, key)
        # What S3 holds, listed back: every file, whole, before anything points at the version
        listed = _list(client, location.bucket, base + "/")
        missing = [r["key"] for r in records if listed.get(f"{base}/{r['key']}") != r["bytes"]]
        if missing:
            raise PublishError(
                f"{len(missing)} file(s) of version {version} are missing or truncated in {location} after "
                f"upload (first: {missing[0]}); CURRENT was not changed"
            )
        record = {
            "version": version,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(Path(repository).resolve()),
            "files": records,
        }
        if unverified:
            record["forced_unverified_plans"] = unverified
        client.put_object(
            Bucket=location.bucket, Key=f"{base}/{RECORD}", Body=json.dumps(record, indent=1).encode()
        )
    except BaseException as e:
        try:
            # Listed, not remembered: an upload whose response was lost may still have landed.
            _delete(client, location.bucket, sorted(_list(client, location.bucket, base + "/")))
            left = "the partial upload was deleted"
        except Exception as cleanup:
            left = (
                f"the partial upload under {location}/{VERSIONS}/{version} could not be deleted ({cleanup})"
            )
        log.error("publishing %s failed; %s; CURRENT still names the previous version", location, left)
        if isinstance(e, VitServeError) or not isinstance(e, Exception):
            raise
        err = _translate(e, f"uploading version {version} to", location)
        raise PublishError(f"{err}; {left}; CURRENT still names the previous version") from e

    try:  # the version is whole: its files and record now refuse another publish of it
        client.delete_object(Bucket=location.bucket, Key=f"{base}/{CLAIM}")
    except Exception as e:
        log.warning("could not remove %s/%s (harmless): %s", base, CLAIM, e)
    endpoint = _endpoint(client)
    url = triton_url(location.bucket, base, endpoint)
    pointer = {"version": version, "prefix": base, "triton_url": url, "files": len(records)}
    condition = {"IfMatch": seen} if seen else {"IfNoneMatch": "*"}
    try:
        client.put_object(
            Bucket=location.bucket,
            Key=location.key(POINTER),
            Body=json.dumps(pointer, indent=1).encode(),
            **condition,
        )
    except Exception as e:
        # Our own PUT may have landed with its response lost (or landed, then its retry read 412).
        try:
            now = _pointer(client, location)[1]
        except PublishError:
            now = None
        if now == version:
            log.info("CURRENT names %s although its PUT reported %s", version, e)
        elif _error_code(e) in POINTER_MOVED:
            raise PublishError(
                f"CURRENT under {location} was moved to version {now} by another publish while this "
                f"one uploaded (it named {seen_version or 'nothing'} when this one started); CURRENT "
                f"was not changed, so a slower publish does not replace a newer one. Version {version} "
                "is uploaded whole but not current; publish again to make this repository current"
            ) from e
        else:
            raise _translate(
                e, f"pointing CURRENT at version {version} (uploaded whole, not current) in", location
            ) from e
    total = sum(r["bytes"] for r in records)
    return Published(location, version, len(records), total, url)


def current(
    url: str, *, endpoint_url: str | None = None, region: str | None = None, client: Any = None
) -> Published:
    """The version CURRENT names under `url`, checked complete (its publish record is there)."""
    location = S3Location.parse(url)
    client = client or s3_client(endpoint_url, region)
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key(POINTER))["Body"].read()
    except Exception as e:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise PublishError(
                f"nothing is published at {location} (no {POINTER}); run `vitserve publish --to {location}`"
            ) from e
        raise _translate(e, "reading the pointer of", location) from e
    try:
        version = json.loads(body)["version"]
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{location}/{POINTER} is not a vitserve pointer: {body[:200]!r}") from e
    base = location.key(VERSIONS, version)
    try:
        record = json.loads(client.get_object(Bucket=location.bucket, Key=f"{base}/{RECORD}")["Body"].read())
    except Exception as e:
        raise PublishError(
            f"{location}/{POINTER} names version {version}, which has no {RECORD} (incomplete or deleted); "
            "publish again"
        ) from e
    files = record.get("files", [])
    return Published(
        location,
        version,
        len(files),
        sum(f["bytes"] for f in files),
        triton_url(location.bucket, base, _endpoint(client)),
    )


def versions(url: str, *, endpoint_url: str | None = None, client: Any = None) -> list[str]:
    """The complete versions under `url` (those with a publish record), oldest first."""
    location = S3Location.parse(url)
    client = client or s3_client(endpoint_url)
    root = location.key(VERSIONS) + "/"
    try:
        keys = _list(client, location.bucket, root)
    except Exception as e:
        raise _translate(e, "listing", location) from e
    parts = [k[len(root) :].split("/") for k in keys]
    return sorted(p[0] for p in parts if len(p) == 2 and p[1] == RECORD)
