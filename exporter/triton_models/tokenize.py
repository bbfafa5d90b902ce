"""Triton python-backend model NAME_text_tokenize: UTF-8 strings -> open_clip's tokens for CLIP model NAME.

    text (BYTES [N, 1]) -> tokens (int64 [N, context_length])

The tokens are open_clip's own: `open_clip.get_tokenizer(tokenizer)` called with `context_length` (text longer
than the context is truncated ending with the end token, as open_clip does), so the served text side computes
exactly what `encode_text(tokenizer(texts))` computes. It needs `open_clip_torch` (and so torch) in the Python
environment that runs the stub: the pip tritonserver runs it with vitserve's venv, which has it; the serving
image installs it (docker/Dockerfile). Without it the model fails to load, saying so.

Bad input fails only its own request with TritonError(INVALID_ARG), naming the string's index and the limit
(`execute()` never raises, since that would fail the whole batch): an empty string (0 bytes), bytes that are
not UTF-8, a string longer than `max_text_bytes` UTF-8 bytes, more than `max_texts` strings in one request.
Parameters: `TextParams` of contract.py (JSON in config.pbtxt `text`), validated when the model loads; the
clients read the same parameter (context length, limits, logit scale, templates) through the model-config API.
"""

from __future__ import annotations

import json

import numpy as np

if __package__:  # part of the vitserve package (the exporter, perf, tests)
    from vitserve.contract import TEXT_INPUT, TextParams
else:  # served by Triton: the repository copies vitserve/contract.py next to this model.py
    from vitserve_contract import TEXT_INPUT, TextParams

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests): only the pure functions are used
    pb_utils = None


class TextError(ValueError):
    """A request's strings are not what this model accepts; the message names the index and the limit."""


def check_texts(items, params: TextParams, input_name: str = TEXT_INPUT) -> list[str]:
    """A request's BYTES elements (bytes or str) as strings, refusing the first bad one by index: empty,
    not UTF-8, longer than `params.max_text_bytes`; and more than `params.max_texts` of them."""
    n = len(items)
    if n > params.max_texts:
        raise TextError(
            f"{input_name}: {n} strings in one request, above the limit of {params.max_texts} (max_texts); "
            "send them in several requests"
        )
    texts = []
    for i, item in enumerate(items):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        if not data:
            raise TextError(f"{input_name}[{i}]: empty string; send at least one character")
        if len(data) > params.max_text_bytes:
            raise TextError(
                f"{input_name}[{i}]: {len(data)} bytes, above the limit of {params.max_text_bytes} UTF-8 bytes "
                f"(max_text_bytes); shorten it (the model reads only its first {params.context_length} tokens)"
            )
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TextError(
                f"{input_name}[{i}]: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "send UTF-8 encoded text"
            ) from None
    return texts


def load_tokenizer(params: TextParams):
    """open_clip's tokenizer of `params.tokenizer`; a missing open_clip fails with the install hint."""
    try:
        import open_clip
    except ImportError as e:
        raise RuntimeError(
            f"NAME_text_tokenize needs open_clip in the Python that runs Triton's python backend stub ({e}); "
            "pip install open_clip_torch there (the serving image has it: docker/Dockerfile)"
        ) from e
    return open_clip.get_tokenizer(params.tokenizer, context_length=params.context_length)


def tokenize_items(tokenizer, items, params: TextParams, input_name: str = TEXT_INPUT) -> np.ndarray:
    """A request's strings -> int64 [N, context_length], open_clip's tokens (TextError for bad input)."""
    texts = check_texts(items, params, input_name)
    tokens = tokenizer(texts, context_length=params.context_length)
    return np.ascontiguousarray(tokens.numpy(), dtype=np.int64)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.params = TextParams.from_model_config(config)  # a malformed parameter fails the load, by name
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.logger = pb_utils.Logger
        self.tokenizer = load_tokenizer(self.params)
        self.logger.log_info(
            f"{config['name']}: open_clip tokenizer {self.params.tokenizer} ({type(self.tokenizer).__name__}), "
            f"context {self.params.context_length}, limits {self.params.max_texts} strings of "
            f"{self.params.max_text_bytes} bytes"
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                items = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
                tokens = tokenize_items(self.tokenizer, items, self.params, self.input_name)
                out = pb_utils.Tensor(self.output_name, tokens)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except TextError as e:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                    )
                )
            except Exception as e:  # a bug here must still fail only this request
                self.logger.log_error(f"tokenize: unexpected {type(e).__name__}: {e}")
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"tokenize failed: {type(e).__name__}: {e}")
                    )
                )
        return responses
