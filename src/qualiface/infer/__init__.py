"""Inference and deployment: model packages, embedding, ONNX export, calibration, search, alignment.

The sub-modules are independent and imported on demand (``from qualiface.infer.model import
Model``); importing ``qualiface.infer`` itself loads nothing heavy.

- ``model``: ``Model.load(...).embed(...)`` on a model package (``model.json`` +
  ``weights.safetensors``; the format, its validation and package I/O are ``qualiface.package``,
  re-exported by ``model``).
- ``images``: turning paths / arrays / tensors into uint8 RGB batches.
- ``export``: ONNX export verified against PyTorch with onnxruntime.
- ``calibrate``: raw quality -> probability that a pair with this sample is verified correctly
  (fitting; the stored form is ``qualiface.package.calibration``).
- ``stream``: per-track (video) template aggregation.
- ``search``: 1:N gallery search (exact torch or faiss), persisted without pickle.
- ``align``: five-point similarity alignment to the 112x112 template.

Nothing here imports ``qualiface.eval``: thresholds, similarity, aggregation and rank accuracy
come from the shared ``qualiface.scoring``.
"""
