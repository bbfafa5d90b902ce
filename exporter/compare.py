"""Numeric comparison of a model's outputs against a reference, per output (parity and fidelity)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per output: cosine min/mean over rows, max abs and rel error; for logits, top-1/top-5 agreement."""
    report: dict[str, dict[str, Any]] = {}
    for name, r in ref.items():
        g = got[name]
        if r.shape != g.shape:
            report[name] = {"error": f"shape {g.shape} != reference {r.shape}"}
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        cos = _cosine_rows(r64, g64)
        diff = np.abs(r64 - g64)
        m: dict[str, Any] = {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "max_abs_err": float(diff.max()),
            "max_rel_err": float((diff / np.maximum(np.abs(r64), 1e-6)).max()),
            "rows": len(r),
        }
        if name == "logits" and r.ndim == 2:
            top_r = np.argsort(-r64, axis=1)
            top_g = np.argsort(-g64, axis=1)
            m["top1_agreement"] = float((top_r[:, 0] == top_g[:, 0]).mean())
            k = min(5, r.shape[1])
            m["top5_agreement"] = float(
                np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(top_r, top_g, strict=True)])
            )
        report[name] = m
    return report


def concat_outputs(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def format_table(
    rows: list[dict[str, Any]], columns: list[str], *, markdown: bool = False, float_format: str | None = None
) -> str:
    """`rows` (dicts) under `columns`: a plain aligned text table, or with `markdown` a Markdown pipe table
    (a missing or None cell is empty). Floats are written with `float_format` (a format spec, e.g. ".4g");
    by default with 6 decimals, or 3 significant digits from 1e4 up."""

    def fmt(v):
        if isinstance(v, float):
            if float_format is not None:
                return format(v, float_format)
            return f"{v:.6f}" if abs(v) < 1e4 else f"{v:.3g}"
        return "" if v is None and markdown else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
