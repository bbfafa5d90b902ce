"""vitserve: a fine-tuned ViT backbone + head to a verified, fast Triton service.

The pipeline, one folder per stage:
  exporter/  torch -> ONNX (+ FP16/INT8 variants, TensorRT engines, the Triton repository)
  client/    Python client for the deployed models (gRPC/HTTP, sync/async)
  perf/      latency/throughput harness (perf_analyzer and a built-in generator)
"""

__version__ = "0.1.0"
