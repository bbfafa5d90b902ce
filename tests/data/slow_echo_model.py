"""A slow, backbone-shaped python-backend model for the shared-memory tests.

`pixel_values` FP32 [-1, 3, 2, 2] -> `embeddings` FP32 [-1, 12], the input flattened, after sleeping
pixel_values[:, 0, 0, 0].max() seconds (at most 10). Each execution appends one JSON line per request to
the file named by the config parameter `log_path`: the values each request's rows carried in [:, 1, 0, 0]
(a test puts one tag per request there), so a test can see what data the server actually computed on.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.log_path = params.get("log_path", {}).get("string_value", "")

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy().copy() for r in requests]
        if self.log_path:
            with open(self.log_path, "a") as f:
                for x in xs:
                    f.write(json.dumps(sorted({float(v) for v in x[:, 1, 0, 0]})) + "\n")
        time.sleep(float(np.clip(max(x[:, 0, 0, 0].max() for x in xs), 0.0, 10.0)))
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embeddings", x.reshape(len(x), -1))])
            for x in xs
        ]
