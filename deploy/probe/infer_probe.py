"""Kubernetes liveness probe: one real inference through the ensemble; exit 0 when it answers correctly.

Triton 2.51 keeps a python-backend model READY after its stub process died, while every request to it fails
(README "Operating it"): only an inference sees that. Standard library only, so it runs in any image with a
python3 (the NGC Triton image, the vitserve CPU image). Environment: MODEL_NAME (default vitb32),
PROBE_URL (default http://127.0.0.1:8000).

    python3 infer_probe.py [--timeout-s 20]
"""

import argparse
import json
import math
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib


def png(width: int = 64, height: int = 64) -> bytes:
    """A small grey gradient PNG, made here (no image library needed)."""
    rows = b"".join(b"\x00" + bytes((x * 4 + y) % 256 for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def probe(url: str, model: str, timeout_s: float) -> str:
    """'' when the model answered a finite, unit-norm embedding, else what went wrong."""
    image = png()
    tensor = struct.pack("<I", len(image)) + image  # Triton's BYTES element: 4-byte length, then the bytes
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [{"name": "embeddings", "parameters": {"binary_data": False}}],
        }
    ).encode()
    req = urllib.request.Request(
        f"{url.rstrip('/')}/v2/models/{model}/infer",
        data=header + tensor,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return f"no answer: {e}"
    outputs = {o.get("name"): o for o in body.get("outputs", [])}
    data = outputs.get("embeddings", {}).get("data")
    if not data:
        return f"no embeddings in the answer: {str(body)[:300]}"
    norm = math.sqrt(sum(float(v) ** 2 for v in data))
    if not all(math.isfinite(float(v)) for v in data) or abs(norm - 1.0) > 1e-2:
        return f"embeddings are not finite and unit-norm (norm {norm:.4f})"
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("PROBE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--model", default=os.environ.get("MODEL_NAME", "vitb32"))
    p.add_argument("--timeout-s", type=float, default=20.0)
    args = p.parse_args()
    problem = probe(args.url, args.model, args.timeout_s)
    if problem:
        print(f"inference probe failed for model {args.model} at {args.url}: {problem}", file=sys.stderr)
        return 1
    print(f"inference probe ok: {args.model} at {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
