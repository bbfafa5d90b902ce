"""onnxruntime sessions on the CPU, set up the way vitserve evaluates and serves ONNX models.

Quantized graphs are scored in a way that does not depend on the CPU that scores them
(`exact_session`): onnxruntime's int8 kernels saturate on x86 hosts without VNNI (u8s8 pairs overflow
int16), so a score taken with them measures the host, not the model. Q/DQ graphs run as fake
quantization in float (session config `session.disable_quant_qdq`), which is what TensorRT's INT8 with
float accumulation computes; MatMulInteger graphs (onnxruntime's dynamic quantization) get their integer
matmuls computed exactly in float64, which is what a VNNI host computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitserve.exporter.triton_models.onnx_cpu import graph_optimization_level

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _options(threads: int | None, optimization: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = graph_optimization_level(optimization)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def cpu_session(path: str | Path, threads: int | None = None, optimization: str = "all"):
    """An onnxruntime CPU session. `optimization` is all | extended | basic | disabled.

    AutoCast FP16 models must use `extended` or lower: with ORT_ENABLE_ALL, onnxruntime 1.24's CPU
    provider has killed the process opening them (see ENVIRONMENT.md).
    """
    import onnxruntime as ort

    so = _options(threads, optimization)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


INTEGER_MATMULS = (
    "MatMulInteger",
    "MatMulIntegerToFloat",
)  # onnxruntime's int8 matmuls (the second: contrib)


def exact_integer_matmuls(model):
    """Rewrite every integer matmul of `model` (in place) into float64 arithmetic with the same result:
    MatMulInteger's int32 (A - a_zero) @ (B - b_zero), and MatMulIntegerToFloat's (onnxruntime contrib:
    that, cast to float32, times a_scale x b_scale, plus bias; exporter/token_int8.py). Products of 8-bit
    values and their sums are exact in float64, so the graph computes what a host without saturation
    (VNNI) computes."""
    from onnx import TensorProto, helper

    nodes = []
    for n in model.graph.node:
        if n.op_type not in INTEGER_MATMULS:
            nodes.append(n)
            continue
        to_float = n.op_type == "MatMulIntegerToFloat"
        a, b = n.input[0], n.input[1]
        zeros = [*(n.input[4:6] if to_float else n.input[2:4]), "", ""]
        p = f"{n.name or n.output[0]}/exact"
        ops, terms = [], []
        for i, (x, z) in enumerate(((a, zeros[0]), (b, zeros[1]))):
            xd = f"{p}/x{i}"
            ops.append(helper.make_node("Cast", [x], [xd], to=TensorProto.DOUBLE, name=f"{p}/cast{i}"))
            if z:
                zd, xs = f"{p}/z{i}", f"{p}/xs{i}"
                ops.append(helper.make_node("Cast", [z], [zd], to=TensorProto.DOUBLE, name=f"{p}/castz{i}"))
                ops.append(helper.make_node("Sub", [xd, zd], [xs], name=f"{p}/sub{i}"))
                xd = xs
            terms.append(xd)
        y = f"{p}/y"
        ops.append(helper.make_node("MatMul", terms, [y], name=f"{p}/matmul"))
        if not to_float:
            ops.append(
                helper.make_node("Cast", [y], [n.output[0]], to=TensorProto.INT32, name=f"{p}/cast_out")
            )
        else:  # the int32 sums as float32 (as the kernel converts them), scaled, plus the bias
            bias = n.input[6] if len(n.input) > 6 else ""
            scaled = f"{p}/scaled" if bias else n.output[0]
            ops.append(helper.make_node("Cast", [y], [f"{p}/yf"], to=TensorProto.FLOAT, name=f"{p}/cast_out"))
            ops.append(helper.make_node("Mul", [n.input[2], n.input[3]], [f"{p}/scale"], name=f"{p}/scale"))
            ops.append(helper.make_node("Mul", [f"{p}/yf", f"{p}/scale"], [scaled], name=f"{p}/mul"))
            if bias:
                ops.append(helper.make_node("Add", [scaled, bias], [n.output[0]], name=f"{p}/bias"))
        nodes.extend(ops)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def float16_as_float32(model):
    """`model` (in place) with its FP16 parts in FP32: FP16 initializers and constants converted, Casts to
    FP16 made Casts to FP32, FP16 value types made FP32. What OpenVINO's CPU plugin computes of a graph
    with FP16 parts (the Q/DQ INT8 ONNX's non-quantized parts, ModelOpt's `high_precision_dtype`): it runs
    them at its inference precision, f32 (or bf16), not in FP16 as TensorRT does."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT

    def widen(t):
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    g = model.graph
    for t in g.initializer:
        if t.data_type == f16:
            widen(t)
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.type == AttributeProto.INT and a.i == f16:
                a.i = f32
            elif a.type == AttributeProto.TENSOR and a.t.data_type == f16:
                widen(a.t)
    for v in (*g.value_info, *g.input, *g.output):
        if v.type.tensor_type.elem_type == f16:
            v.type.tensor_type.elem_type = f32
    return model


def _session_of(model, so):
    """A CPU session of an in-memory `model`; past protobuf's 2 GiB through a temporary file with external
    data, kept as long as the session is."""
    import tempfile

    import onnx
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if model.ByteSize() < 2**31 - 2**20:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    tmp = tempfile.TemporaryDirectory(prefix="vitserve-float32-")
    path = Path(tmp.name) / "float32.onnx"  # a scratch copy, not a served file
    onnx.save_model(model, str(path), save_as_external_data=True, location="float32.onnx.data")
    session = ort.InferenceSession(str(path), so, providers=providers)
    session.vitserve_tmp = tmp  # removed with the session
    return session


def exact_session(
    path: str | Path, threads: int | None = None, optimization: str = "all", float32: bool = False
):
    """A session that scores `path` independently of the host's int8 kernels (see the module doc).
    Float models get a plain `cpu_session`. `float32`: a Q/DQ graph's FP16 parts run in FP32
    (`float16_as_float32`: what OpenVINO computes of it, where the default is what TensorRT computes).
    Returns (session, description of the evaluator)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & set(INTEGER_MATMULS):
        # Dynamic-quantization models are small (int8 weights), so they are rewritten in memory.
        model = onnx.load(str(path))
        so = _options(threads, optimization)
        session = ort.InferenceSession(
            exact_integer_matmuls(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        return (
            session,
            "integer matmuls computed exactly (float64): what a host whose int8 kernels fit the flavour computes",
        )
    if ops & QDQ_OPS:
        so = _options(threads, optimization)
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        what = "Q/DQ run as fake quantization in float (session.disable_quant_qdq=1)"
        if float32:
            session = _session_of(float16_as_float32(onnx.load(str(path))), so)
            return session, what + ", its FP16 parts in FP32"
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return session, what
    return cpu_session(path, threads, optimization), "float graph"


def run(session, pixel_values: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Run `pixel_values` (N,3,H,W) through the session in chunks; outputs by name."""
    names = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0].name
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(pixel_values), batch_size):
        outs = session.run(names, {inp: np.ascontiguousarray(pixel_values[i : i + batch_size], np.float32)})
        for n, o in zip(names, outs, strict=True):
            chunks[n].append(o)
    return {n: np.concatenate(c) for n, c in chunks.items()}
