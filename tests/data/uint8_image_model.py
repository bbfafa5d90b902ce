"""A python-backend stand-in for a DALI preprocess, for the client's UINT8 tests (tests/test_client_uint8.py).

Same interface as Triton's DALI backend model of `preprocess: dali`: input `image` UINT8 [-1, -1], one
image's raw encoded bytes per batch row, ragged batching. For each request it returns what it received:
`embeddings` FP32 [8] = [byte count, crc32 >> 16, crc32 & 0xffff, decoded width, decoded height, first
byte, last byte, requests in this execution], and `probs` FP32 [3], one-hot on byte count % 3 (labels a b c).
Bytes Pillow cannot decode fail that request alone with INVALID_ARG, as the python preprocess does; with
the config parameter `batch_errors` "true" they fail every request of the execution with the code and the
kind of message dali_backend sends: TRITONSERVER_ERROR_UNKNOWN, "Runtime error: ..." (ErrorHandler() in
triton-inference-server/dali_backend src/dali_model_instance.cc, commit 01783f8: every DALI exception of a
batch becomes UNKNOWN, copied to each response of the batch). tritonserver answers UNKNOWN with HTTP 400 but
gRPC StatusCode.UNKNOWN.
"""

import io
import json
import zlib

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.batch_errors = params.get("batch_errors", {}).get("string_value", "") == "true"

    def execute(self, requests):
        # decode everything first, then answer: responses are made once (tritonserver 2.51's python
        # backend crashes when a response holding output tensors is made and then dropped)
        results = [_receive(pb_utils.get_input_tensor_by_name(r, "image").as_numpy()) for r in requests]
        failed = [r for r in results if isinstance(r, str)]
        responses = []
        for result in results:
            code = pb_utils.TritonError.INVALID_ARG
            if self.batch_errors and failed:
                result = f"Runtime error: Critical error in pipeline:\nbatch failed: {failed[0]}"
                code = pb_utils.TritonError.UNKNOWN
            if isinstance(result, str):
                err = pb_utils.TritonError(result, code)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            data, w, h = result
            crc = zlib.crc32(data)
            emb = [len(data), crc >> 16, crc & 0xFFFF, w, h, data[0], data[-1], len(requests)]
            probs = np.zeros((1, 3), dtype=np.float32)
            probs[0, len(data) % 3] = 1.0
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("embeddings", np.asarray([emb], dtype=np.float32)),
                        pb_utils.Tensor("probs", probs),
                    ]
                )
            )
        return responses


def _receive(x: np.ndarray):
    """(bytes, width, height) of one request's image, or the reason it cannot be decoded."""
    try:
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[0] != 1:
            raise ValueError(f"expected one row of uint8, got {x.dtype} {list(x.shape)}")
        data = x.tobytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return data, im.width, im.height
    except Exception as e:
        return f"cannot decode image: {type(e).__name__}: {e}"
