"""Build stages, one module each: export (torch -> ONNX), precision (ONNX -> FP16/INT8 ONNX),
engine (ONNX -> TensorRT plan), repository (artifacts -> Triton model repository), pipeline (all of it,
for every model in models.yaml)."""
