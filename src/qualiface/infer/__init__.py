"""Inference and deployment: model packages, embedding, ONNX export, calibration, search, alignment.

The sub-modules are independent and imported on demand (``from qualiface.infer.model import
Model``); importing ``qualiface.infer`` itself loads nothing heavy.

- ``model``: the self-describing model package (``model.json`` + ``weights.safetensors``),
  ``save_model_package`` and ``Model.load(...).embed(...)``.
- ``images``: turning paths / arrays / tensors into uint8 RGB batches.
- ``export``: ONNX export verified against PyTorch with onnxruntime.
- ``calibrate``: raw quality -> probability that a pair with this sample is verified correctly.
- ``stream``: per-track (video) template aggregation.
- ``search``: 1:N gallery search (exact torch or faiss), persisted without pickle.
- ``align``: five-point similarity alignment to the 112x112 template.
"""
