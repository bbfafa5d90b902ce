"""Triton python-backend model: an ONNX backbone run by onnxruntime on the CPU.

The pip-installed tritonserver has only the python backend; this model lets the same repository serve on
CPU-only hosts. All requests of a dynamic batch run as one onnxruntime call, then are split back.
Self-contained (numpy + onnxruntime). Parameters (JSON in `onnx_cpu`): intra_op_threads, optimization.
"""

from __future__ import annotations

import json
import os

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = json.loads(config["parameters"]["onnx_cpu"]["string_value"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        }[params.get("optimization", "all")]
        if params.get("intra_op_threads"):
            so.intra_op_num_threads = int(params["intra_op_threads"])
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        try:
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            results = self.session.run(
                self.outputs, {self.input_name: np.ascontiguousarray(batch, np.float32)}
            )
        except Exception as e:  # one response per request, never an exception out of execute()
            err = pb_utils.TritonError(f"onnxruntime failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            stop = start + len(a)
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(r[start:stop]))
                for n, r in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses
