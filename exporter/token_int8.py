"""Per-token int8 for the CPU: an image's answer does not depend on the images batched with it.

onnxruntime's dynamic quantization (`quantize_dynamic`) quantizes a matmul's activations with one scale
for the whole call: the same image, batched with others, gets other scales and another embedding (max abs
2.7e-3 to 3.4e-3 on the L2-normalised embedding of ViT-B-32; perf/results/cpu_engines.md). Here every row
of a matmul's input (one token of one image) gets its own scale, computed from that row alone, so an image's
integers, and its embedding, are the same alone or in any batch.

Each MatMul / Gemm whose weight is a 2-D initializer becomes (x: [..., K] -> rows [R, K])

    s   = max(max_k |x[r, k]|, tiny) / 127                       per row
    q   = QuantizeLinear(x, s, 128, axis=0)                      uint8, the row's zero at 128
    y   = MatMulIntegerToFloat(q, Wq, 1, w_scale, 128) * s       onnxruntime's fused int8 GEMM, int32 sums
                                                                 scaled per column, then per row
    (+ bias), reshaped back to [..., N]

Weights: int8 per output channel, symmetric; 7 bits (|q| <= 63) for the portable flavour, so u8 x s8 pairs
summed in int16 (AVX2's vpmaddubsw) cannot saturate (2 * 255 * 63 < 32767), 8 bits for hosts whose int8
products sum in int32 (VNNI, AMX). Activations are symmetric around a fixed zero point (128) because
onnxruntime's integer matmuls take a scalar activation zero point only; per token, the range is the
token's own, which makes up for the bit a symmetric range gives away (ViT-B-32: cosine to FP32 0.99976
per token against 0.99975 per call). Attention's matmuls (both inputs activations) stay in float.
Measured in-process on a 2-core AVX2 host (random init, 2 threads): 0.97-0.98x (ViT-B-32, 50 tokens) and 0.90x
(ViT-B-16, 197 tokens: the per-row scale costs grow with the tokens) the img/s of the
per-call flavour at batch 1 and 8 (perf/results/cpu_engines.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the most an int8 weight may reach: full range (VNNI) or 7 bits (no int16 saturation), by `reduce_range`
WEIGHT_QMAX = {False: 127, True: 63}
ZERO_POINT = 128  # the activations' zero point (uint8): symmetric, the row's scale sets the range
ACTIVATION_QMAX = 127.0


def quantize_weight(w: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [K, N], float32 scale [N]) of a float weight [K, N], symmetric per output channel."""
    w = np.asarray(w, np.float64)
    qmax = WEIGHT_QMAX[reduce_range]
    scale = np.abs(w).max(axis=0) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8), scale


def _quantizable(node, inits: dict) -> tuple[str, bool] | None:
    """(weight initializer, stored transposed) of a MatMul / plain Gemm with a constant 2-D weight."""
    from onnx import helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    weight = node.input[1]
    if weight not in inits or len(inits[weight].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return weight, False
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        return None
    return weight, bool(a.get("transB", 0))


def quantize_per_token(src: Path, dst: Path, reduce_range: bool) -> dict[str, int]:
    """Write `src` (an FP32 ONNX) to `dst` with every constant-weight MatMul / Gemm quantized per token
    (module doc). Returns how many matmuls were quantized and how many stayed float."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts: list = []
    nodes: list = []
    replaced = set()
    quantized = kept = 0

    def const(name: str, array: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(array, f"token_int8/{name}"))
        return f"token_int8/{name}"

    qmax = const("qmax", np.array(ACTIVATION_QMAX, np.float32))
    tiny = const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))
    zero_point = const("zero_point", np.array(ZERO_POINT, np.uint8))
    one = const("one", np.array(1.0, np.float32))
    last_axis = const("last_axis", np.array([1], np.int64))

    for n in graph.node:
        found = _quantizable(n, inits)
        if found is None:
            kept += n.op_type in ("MatMul", "Gemm")
            nodes.append(n)
            continue
        weight, transposed = found
        quantized += 1
        replaced.add(weight)
        w = numpy_helper.to_array(inits[weight])
        wq, w_scale = quantize_weight(w.T if transposed else w, reduce_range)
        k, cols = wq.shape
        p = n.name or n.output[0]
        t = {v: f"token_int8/{p}/{v}" for v in ("x2", "hi", "nlo", "lo", "absmax", "s0", "s", "rows", "z", "q",
                                                "yw", "s1", "y2", "lead", "shape", "y")}  # fmt: skip
        bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 else ""
        out = t["y"] if bias else n.output[0]
        ops = [
            # one row per token: QuantizeLinear takes a scale per row along axis 0 of a 2-D tensor
            helper.make_node("Reshape", [n.input[0], const(f"{p}/rows_k", np.array([-1, k], np.int64))], [t["x2"]]),
            helper.make_node("ReduceMax", [t["x2"]], [t["hi"]], axes=[1], keepdims=0),  # opset < 18: attribute
            helper.make_node("ReduceMin", [t["x2"]], [t["lo"]], axes=[1], keepdims=0),
            helper.make_node("Neg", [t["lo"]], [t["nlo"]]),
            helper.make_node("Max", [t["hi"], t["nlo"], tiny], [t["absmax"]]),
            helper.make_node("Div", [t["absmax"], qmax], [t["s"]]),
            helper.make_node("Shape", [t["s"]], [t["rows"]]),
            helper.make_node("Expand", [zero_point, t["rows"]], [t["z"]]),
            helper.make_node("QuantizeLinear", [t["x2"], t["s"], t["z"]], [t["q"]], axis=0),
            # int32 sums of (q - 128) x Wq, times w_scale per column, fused; then the row's scale
            helper.make_node(
                "MatMulIntegerToFloat",
                [t["q"], const(f"{p}/w", wq), one, const(f"{p}/w_scale", w_scale), zero_point],
                [t["yw"]],
                domain="com.microsoft",
            ),
            helper.make_node("Unsqueeze", [t["s"], last_axis], [t["s1"]]),
            helper.make_node("Mul", [t["yw"], t["s1"]], [t["y2"]]),
            # back to the input's leading dims
            helper.make_node("Shape", [n.input[0]], [t["lead"]], end=-1),
            helper.make_node("Concat", [t["lead"], const(f"{p}/cols", np.array([cols], np.int64))], [t["shape"]], axis=0),
            helper.make_node("Reshape", [t["y2"], t["shape"]], [out]),
        ]  # fmt: skip
        if bias:
            ops.append(helper.make_node("Add", [out, bias], [n.output[0]]))
        for i, op in enumerate(ops):
            op.name = f"token_int8/{p}/{i}_{op.op_type}"
        nodes += ops

    used = {i for node in nodes for i in node.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + consts)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return {"quantized_matmuls": quantized, "float_matmuls": kept}
