"""Python client for a vitserve deployment: embeddings and top-k labels over gRPC or HTTP, sync or asyncio.

    from vitserve.client import VitClient

    with VitClient("localhost:8001", model="vitb32") as client:
        result = client.embed(["a.jpg", "b.png"])        # result.embeddings (N, D), result.errors {index: msg}
        top = client.classify(["a.jpg"], top_k=3)         # [[("cat", 0.91), ...]]
        text = client.embed_text("a photo of a cat")      # (1, D), the image embeddings' space
        top = client.classify(["a.jpg"], labels=["cat", "dog", "car"])  # labels chosen per call

Only tritonclient, numpy and Pillow are needed (the `client` extra); torch is never imported.
"""

from vitserve.client.aio import AsyncVitClient
from vitserve.client.config import ClientConfig, Protocol
from vitserve.client.results import ClassifyResult, EmbedResult
from vitserve.client.schema import ModelInfo
from vitserve.client.shm import SharedMemory
from vitserve.client.sync import VitClient

__all__ = [
    "AsyncVitClient",
    "ClassifyResult",
    "ClientConfig",
    "EmbedResult",
    "ModelInfo",
    "Protocol",
    "SharedMemory",
    "VitClient",
]
