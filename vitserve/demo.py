"""`make demo`: build the default model, serve it, classify the sample photos, search them by sentences (a
model with a text side: `text: true`), print a throughput figure.

Offline (no route to the weights hub) it says so loudly and builds with random-init weights: the
pipeline, the server and the client are real; the labels are then meaningless.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path


def weights_hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def run_demo(
    config: str = "models.yaml",
    repository: str = "model_repository",
    artifacts: str = "artifacts",
    images: int = 64,
    batch_size: int = 8,
) -> dict:
    """Build, serve, classify the bundled photos, measure `embed` throughput, stop the server."""
    from vitserve.client import VitClient
    from vitserve.exporter.config import load_models
    from vitserve.exporter.pipeline import build_all
    from vitserve.exporter.samples import write_eval_images
    from vitserve.server import TritonServer

    spec = load_models(config)[0]
    model = spec.name
    random_init = not weights_hub_reachable()
    if random_init:
        print("=" * 78)
        print("OFFLINE: the pretrained weights cannot be downloaded here, so this demo builds the model")
        print("with RANDOM-INIT weights. Everything else is real; the predicted labels are meaningless.")
        print("=" * 78)
    build_all(config, repository, artifacts, random_init=random_init, only=[model])
    photos = write_eval_images(Path(artifacts) / "demo_images")
    with TritonServer(repository, log_path=Path(artifacts) / "demo_server.log") as server:
        print(f"tritonserver ready (gRPC {server.grpc_url}, HTTP {server.http_url})")
        with VitClient(server.grpc_url, model=model, batch_size=batch_size) as client:
            top = client.classify(photos, top_k=3)
            for path, labels in zip(photos, top, strict=True):
                print(
                    f"  {path.name:28s} " + "  ".join(f"{label} {score:.3f}" for label, score in labels or [])
                )
            if spec.text:
                _text_side(client, photos)
            batch = [photos[i % len(photos)] for i in range(images)]
            client.embed(batch[:batch_size])  # warm-up
            t0 = time.perf_counter()
            result = client.embed(batch)
            seconds = time.perf_counter() - t0
    ips = len(result.embeddings) / seconds
    print(
        f"embed: {len(result.embeddings)} images in {seconds:.2f} s = {ips:.1f} images/s "
        f"(gRPC, batch {batch_size}, CPU server){' [random-init weights]' if random_init else ''}"
    )
    return {"model": model, "random_init": random_init, "images_per_s": ips}


SENTENCES = ("an astronaut in a space suit", "a cup of coffee on a table", "a cat sleeping")


def _text_side(client, photos: list[Path]) -> None:
    """Text and images side by side: the photo each sentence finds (text and image embeddings share one
    space), and the photos classified against labels chosen here, at request time."""
    import numpy as np

    images = client.embed(photos)
    sentences = client.embed_text(list(SENTENCES))
    scores = np.asarray(sentences) @ np.asarray(images).T
    print("search by sentence (NAME_text + NAME):")
    for sentence, row in zip(SENTENCES, scores, strict=True):
        best = int(np.nanargmax(row))
        print(f"  {sentence!r:36s} -> {photos[best].name} (cosine {row[best]:.3f})")
    labels = ["a dog", "a rocket", "a person", "a drink"]
    print(f"labels chosen at request time {labels}:")
    for path, top in zip(photos[:4], client.classify(photos[:4], top_k=1, labels=labels), strict=True):
        print(f"  {path.name:28s} " + "  ".join(f"{label} {score:.3f}" for label, score in top or []))
