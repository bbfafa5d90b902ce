"""Results of a call: the values in input order, and the images that failed, by index."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vitserve.errors import ClientError


def failure_message(
    errors: dict[int, str], sources: dict[int, str] | None = None, limit: int = 10, noun: str = "image"
) -> str:
    sources = sources or {}
    lines = [
        f"{noun} {i}" + (f" ({sources[i]})" if i in sources else "") + f": {errors[i]}"
        for i in sorted(errors)
    ]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{len(errors)} {noun}(s) failed:\n  " + "\n  ".join(lines[:limit]) + more


@dataclass
class EmbedResult:
    """`embeddings` (N, D) float32 in input order, a row of NaN for each failed image; `errors` maps the index
    of each failed image to the server's message. Behaves as the array for numpy (`np.asarray(result)`)."""

    embeddings: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the images that have an embedding."""
        mask = np.ones(len(self.embeddings), dtype=bool)
        mask[list(self.errors)] = False
        return mask

    @property
    def shape(self) -> tuple[int, ...]:
        return self.embeddings.shape

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.embeddings if dtype is None else self.embeddings.astype(dtype)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index):
        return self.embeddings[index]

    def raise_for_errors(self) -> EmbedResult:
        """Raise ClientError naming every failed index; returns self when none failed."""
        if self.errors:
            raise ClientError(failure_message(self.errors))
        return self


@dataclass
class ClassifyResult:
    """`predictions[i]` is image i's top-k as [(label, score)], best first, or None when it failed; `errors`
    maps the index of each failed image to the server's message. Behaves as the list of predictions.
    With labels chosen at request time (`classify(images, labels=...)`) `logits` holds every image's logits
    over those labels, (N, L) float32 in their order (NaN rows for failed images); otherwise it is None."""

    predictions: list[list[tuple[str, float]] | None]
    errors: dict[int, str] = field(default_factory=dict)
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, index):
        return self.predictions[index]

    def __iter__(self) -> Iterator[list[tuple[str, float]] | None]:
        return iter(self.predictions)

    def raise_for_errors(self) -> ClassifyResult:
        """Raise ClientError naming every failed index; returns self when none failed."""
        if self.errors:
            raise ClientError(failure_message(self.errors))
        return self


def parse_classification(entry: bytes | str) -> tuple[str, float]:
    """One Triton classification string, "score:index:label" (or "score:index" without labels)."""
    text = entry.decode() if isinstance(entry, bytes) else str(entry)
    parts = text.split(":", 2)
    label = parts[2] if len(parts) == 3 else parts[1]
    return label, float(parts[0])
