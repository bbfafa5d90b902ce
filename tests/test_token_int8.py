"""Per-token int8 (exporter/token_int8.py): an image's answer does not depend on its batch-mates, the graph
computes the scheme it documents, and its exact (host-independent) evaluation is what 7-bit kernels give.

Nothing here depends on the CPU: 7-bit weights cannot saturate on any x86-64 int8 kernel, and the 8-bit
flavour is only compared through the exact (float64) evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitserve.exporter import onnxrt
from vitserve.exporter.token_int8 import ACTIVATION_QMAX, ZERO_POINT, quantize_per_token, quantize_weight

K, N, T = 48, 24, 5


def _model(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """x [B, T, K] -> MatMul(w1) -> Relu -> reshape [B*T, N] -> Gemm(w2^T, bias, transB) -> y [B*T, N], and
    an attention-like MatMul of two activations (stays float)."""
    w = {
        "w1": rng.standard_normal((K, N)).astype(np.float32) / np.sqrt(K),
        "w2": rng.standard_normal((N, N)).astype(np.float32) / np.sqrt(N),  # stored [N_out, N_in]: transB
        "b2": rng.standard_normal(N).astype(np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([-1, N], np.int64), "flat"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("Reshape", ["a", "flat"], ["a2"], name="rows"),
        helper.make_node("Gemm", ["a2", "w2", "b2"], ["y"], transB=1, name="fc2"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="ht"),
        helper.make_node("MatMul", ["h", "ht"], ["att"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_token",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("att", TensorProto.FLOAT, None),
        ],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return w


def _reference(x: np.ndarray, w: np.ndarray, reduce_range: bool) -> np.ndarray:
    """The documented scheme in numpy: per row s = absmax / 127, q = round(x / s) (zero point 128), int8
    weights per column, exact integer sums, times w_scale and s."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    s = np.maximum(np.abs(rows).max(axis=1), np.finfo(np.float32).tiny) / np.float32(ACTIVATION_QMAX)
    q = np.clip(np.round(rows / s[:, None]) + ZERO_POINT, 0, 255) - ZERO_POINT
    wq, w_scale = quantize_weight(w, reduce_range)
    acc = q.astype(np.int64) @ wq.astype(np.int64)
    return (acc.astype(np.float32) * w_scale[None, :] * s[:, None]).reshape(*x.shape[:-1], w.shape[1])


def _run(session, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"x": x}), strict=True))


@pytest.fixture(scope="module")
def token_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_int8")
    rng = np.random.default_rng(0)
    weights = _model(root / "fp32.onnx", rng)
    counts = {}
    for bits, reduce_range in ((7, True), (8, False)):
        counts[bits] = quantize_per_token(root / "fp32.onnx", root / f"int8_{bits}.onnx", reduce_range)
    # tokens of very different ranges: a per-call scale would be set by the largest
    x = rng.standard_normal((6, T, K)).astype(np.float32) * np.geomspace(0.01, 50, 6)[:, None, None].astype(
        np.float32
    )
    return root, weights, counts, x


def test_constant_weight_matmuls_are_quantized_and_attention_stays_float(token_models):
    root, _, counts, _ = token_models
    assert counts[7] == {"quantized_matmuls": 2, "float_matmuls": 1}
    ops = [n.op_type for n in onnx.load(str(root / "int8_7.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("MatMul") == 1 and "Gemm" not in ops


@pytest.mark.parametrize("bits", [7, 8])
def test_an_image_gets_the_same_answer_alone_and_in_any_batch(token_models, bits):
    """Exact equality, on this host's kernels (7 bits) and on the exact evaluation (both)."""
    root, _, _, x = token_models
    sessions = [onnxrt.exact_session(root / f"int8_{bits}.onnx")[0]]
    if bits == 7:
        sessions.append(onnxrt.cpu_session(root / f"int8_{bits}.onnx"))
    for session in sessions:
        batch = _run(session, x)["y"].reshape(len(x), T, N)
        for i in range(len(x)):
            alone = _run(session, x[i : i + 1])["y"].reshape(1, T, N)
            np.testing.assert_array_equal(alone[0], batch[i])
        pair = _run(session, x[[4, 0]])["y"].reshape(2, T, N)
        np.testing.assert_array_equal(pair, batch[[4, 0]])


def test_per_call_dynamic_quantization_is_not_batch_invariant(token_models, tmp_path):
    """The property above is not automatic: onnxruntime's per-call dynamic quantization of the same model
    gives the small-range image another answer when it is batched with a large-range one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root, _, _, x = token_models
    dst = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(root / "fp32.onnx"), str(dst), per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
    session = onnxrt.exact_session(dst)[0]
    alone = _run(session, x[:1])["y"]
    batched = _run(session, x[[0, 5]])["y"][: len(alone)]
    assert np.abs(alone - batched).max() > 1e-3 * np.abs(alone).max()


@pytest.mark.parametrize("bits", [7, 8])
def test_the_graph_computes_the_documented_scheme(token_models, bits):
    """fc1 of the quantized graph (its first output, read through `h`'s consumer: Relu is exact) equals the
    numpy reference of the scheme, and the exact evaluation equals the 7-bit kernels of this host."""
    root, w, _, x = token_models
    exact = _run(onnxrt.exact_session(root / f"int8_{bits}.onnx")[0], x)
    want_h = _reference(x, w["w1"], reduce_range=bits == 7)
    want_y = _reference(np.maximum(want_h, 0), w["w2"].T, reduce_range=bits == 7).reshape(-1, N) + w["b2"]
    np.testing.assert_allclose(exact["y"], want_y, rtol=1e-4, atol=1e-4 * np.abs(want_y).max())
    if bits == 7:  # 7-bit weights: no int16 saturation on any x86-64 kernel
        native = _run(onnxrt.cpu_session(root / "int8_7.onnx"), x)
        np.testing.assert_allclose(native["y"], exact["y"], rtol=1e-6, atol=1e-6 * np.abs(exact["y"]).max())
    fp32 = _run(onnxrt.cpu_session(root / "fp32.onnx"), x)["y"]
    cos = (exact["y"] * fp32).sum(1) / np.linalg.norm(exact["y"], axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.999, cos.min()
