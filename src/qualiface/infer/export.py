"""ONNX export of a model package, verified against PyTorch with onnxruntime.

The exported graph is ``InferenceModule`` (backbone + quality estimator):

- input ``input``: float32 (B, 3, H, W), **already normalised** exactly as ``model.json``
  says (``(pixel / 255 - mean) / std``, channel order as in ``input.channel_order``). Float
  input keeps the graph free of preprocessing choices (resizing, channel order) that differ
  between deployments; ``Model.preprocess`` shows the reference computation.
- outputs exactly what ``qualiface embed`` writes: ``embedding`` float32 (B, D) L2-normalised
  (unit norm: cosine similarity = dot product), ``norm`` float32 (B,) the L2 norm of the raw
  embedding (for norm-based heads it carries quality), and ``quality`` float32 (B,) raw.
- the batch axis is dynamic.

With ``fp16`` the weights and the computation are float16, but input and outputs stay float32
(casts at both ends), so callers feed the same arrays. ``model.json`` is embedded in the ONNX
metadata (key ``qualiface.model_json``) so the calibration and the quality meaning travel
with the file, and the input and output conventions stand alone under ``qualiface.input.*`` /
``qualiface.output.*`` keys (:func:`onnx_conventions`) for readers that parse nothing.

The TorchScript-based exporter (``dynamo=False``) is the default: it is fast and reliable for
these convolutional nets; ``exporter="dynamo"`` uses ``torch.export`` + onnxscript instead.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qualiface.errors import QualifaceError
from qualiface.files import FileWriteError, atomic_path
from qualiface.infer.model import Model, normalise_embeddings

EXPORTERS = ("torchscript", "dynamo")
# The lowest opset our networks export under: below 10 ONNX has no strided Slice (IResNet's
# feature maps need one) and torch answers with its whole IR graph printed to the terminal; 11
# is the lowest this package verifies against onnxruntime.
MIN_OPSET = 11


def supported_opsets() -> range:
    """The opsets ``export_onnx`` accepts: ``MIN_OPSET`` up to the newest the installed torch
    writes (read from torch, whose newest grows with its version; 20 if it cannot be read)."""
    try:
        from torch.onnx import _constants  # lazy: private module, read only when exporting

        newest = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        newest = 20
    return range(MIN_OPSET, newest + 1)
MODEL_JSON_KEY = "qualiface.model_json"
# Tolerance = absolute + relative * (largest |output|), as in numpy.allclose. The relative part
# matters only for large outputs (an untrained deep net can emit values ~1e5, where float32
# rounding alone differs by ~0.1); for trained models the 1e-3 absolute term dominates.
FP32_TOLERANCE = 1e-3
FP32_RELATIVE_TOLERANCE = 1e-5
FP16_RELATIVE_TOLERANCE = 1e-2  # fp16 keeps ~3 significant digits


class ExportError(QualifaceError, RuntimeError):
    """Export failed or the exported graph disagrees with PyTorch beyond the tolerance."""


class _Float16Wrapper(nn.Module):
    """Runs the network in float16 between float32 input and outputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, x: torch.Tensor):
        embedding, quality = self.inner(x.half())
        return embedding.float(), quality.float()


class _EmbedOutputs(nn.Module):
    """(raw embedding, quality) -> ``embed``'s (unit-norm embedding, norm, quality)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        embedding, quality = self.inner(x)
        normalised, norms = normalise_embeddings(embedding)
        return normalised, norms, quality


OUTPUT_NAMES = ("embedding", "norm", "quality")


def onnx_conventions(model: Model) -> dict[str, str]:
    """The input preprocessing and output meaning, as ONNX ``metadata_props`` (key -> text)."""
    h, w = model.spec.input_size
    return {
        "qualiface.input.layout": f"float32 (B, 3, {h}, {w}) NCHW",
        "qualiface.input.channel_order": model.spec.channel_order,
        "qualiface.input.normalisation": "(pixel / 255 - mean) / std per channel, pixel uint8 0..255",
        "qualiface.input.mean": json.dumps(list(model.spec.mean)),
        "qualiface.input.std": json.dumps(list(model.spec.std)),
        "qualiface.output.embedding": f"float32 (B, {model.spec.embedding_size}) L2-normalised (unit norm), "
        "as 'qualiface embed' writes; cosine similarity = dot product",
        "qualiface.output.norm": "float32 (B,) L2 norm of the raw embedding",
        "qualiface.output.quality": f"float32 (B,) raw quality ({model.spec.quality.kind}): "
        f"{model.spec.quality.meaning}",
    }


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how well onnxruntime reproduces PyTorch (fp32 reference)."""

    path: Path
    opset: int
    fp16: bool
    exporter: str
    max_abs_diff_embedding: float
    max_abs_diff_quality: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    max_abs_diff_norm: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)  # the conventions stored in the file
    # Each output is held to its own scale (None: ``tolerance``); ``tolerance`` is the
    # embedding's, whose scale is 1 (unit vectors).
    tolerance_norm: float | None = None
    tolerance_quality: float | None = None

    @property
    def passed(self) -> bool:
        norm = self.tolerance if self.tolerance_norm is None else self.tolerance_norm
        quality = self.tolerance if self.tolerance_quality is None else self.tolerance_quality
        return (self.max_abs_diff_embedding <= self.tolerance and self.max_abs_diff_norm <= norm
                and self.max_abs_diff_quality <= quality)


def _export(module: nn.Module, example: torch.Tensor, out: Path, opset: int, exporter: str) -> None:
    names = dict(input_names=["input"], output_names=list(OUTPUT_NAMES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter; verification is the real check
        if exporter == "torchscript":
            torch.onnx.export(
                module, (example,), str(out), dynamo=False, opset_version=opset, do_constant_folding=True,
                dynamic_axes={name: {0: "batch"} for name in ("input", *OUTPUT_NAMES)},
                **names,
            )
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},),
                verbose=False, **names,
            )
            program.save(str(out))


def _attach_metadata(path: Path, model: Model, fp16: bool) -> None:
    import onnx  # lazy: optional dependency (the `onnx` extra)

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = MODEL_JSON_KEY, json.dumps(model.spec.to_json())
    for key, value in onnx_conventions(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    h, w = model.spec.input_size
    proto.doc_string = (
        f"qualiface {model.spec.backbone_name} ({'fp16' if fp16 else 'fp32'} weights). input: float32 "
        f"(B, 3, {h}, {w}) {model.spec.channel_order}, (pixel/255 - mean)/std with mean={list(model.spec.mean)} "
        f"std={list(model.spec.std)}; outputs: embedding (B, {model.spec.embedding_size}) unit-norm, "
        f"norm (B,) of the raw embedding, quality (B,) raw ({model.spec.quality.kind})."
    )
    onnx.save(proto, str(path))


def _check_finite_outputs(module: nn.Module, example: torch.Tensor, model: Model, fp16: bool) -> None:
    """Refuse, before anything is written, a network whose outputs on ordinary images are NaN/Inf.

    Otherwise the .onnx is written first and the failure surfaces only as a confusing "nan"
    difference against onnxruntime; with ``fp16`` this also catches float16 overflow.
    """
    with torch.no_grad():
        outputs = module(example)
    if not all(bool(torch.isfinite(t).all()) for t in outputs):
        precision = "fp16" if fp16 else "fp32"
        raise ExportError(f"{model.source}: the model produces non-finite outputs (NaN/Inf) on "
                          f"random {precision} input images; refusing to export")


def compare_with_onnxruntime(path: str | Path, model: Model, images: torch.Tensor) -> tuple[float, float, float]:
    """Max |onnxruntime - PyTorch| over uint8 ``images`` (B, 3, H, W) for (embedding, norm, quality).

    ``model`` must be on the CPU (the PyTorch reference runs in float32 there).
    """
    import onnxruntime as ort  # lazy: optional dependency (the `onnx` extra)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = model.preprocess(images).cpu()
    outputs = session.run(list(OUTPUT_NAMES), {"input": x.numpy()})
    with torch.no_grad():
        references = _EmbedOutputs(model.module)(x)
    return tuple(float(np.abs(out - ref.numpy()).max()) for out, ref in zip(outputs, references))


def _tolerance(scale: float, fp16: bool) -> float:
    """The allowed max |onnxruntime - PyTorch| for an output whose largest |value| is ``scale``."""
    if fp16:
        return FP16_RELATIVE_TOLERANCE * max(scale, 1.0)
    return FP32_TOLERANCE + FP32_RELATIVE_TOLERANCE * scale


def export_onnx(
    model: Model,
    out: str | Path,
    *,
    fp16: bool = False,
    opset: int = 17,
    exporter: str = "torchscript",
    verify_batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ``out`` and verify it with onnxruntime on random images.

    Verification runs each batch size in ``verify_batch_sizes`` (two sizes exercise the
    dynamic batch axis). Tolerance, per output, from that output's own largest |value| (1 for
    the unit-norm embedding): fp32 1e-3 + 1e-5 x it (allclose-style; 1e-3 for outputs of order
    1); fp16 1% of it. Raises :class:`ExportError` when the export fails or misses a tolerance.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    opsets = supported_opsets()
    if opset not in opsets:
        raise ExportError(f"opset {opset} is not supported: use {opsets.start} to {opsets.stop - 1} "
                          "(default 17)")
    try:  # both are needed to finish; missing, they were a traceback after the export ran
        import onnx  # noqa: F401  # lazy: optional dependency (the `onnx` extra)
        import onnxruntime  # noqa: F401  # lazy: optional dependency (the `onnx` extra)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc}): pip install "
                          "'qualiface[onnx]'") from None
    out = Path(out)
    # Checked before the export (seconds to minutes): replacing a folder fails only at the end,
    # and replacing another kind of file (``--out pkg/model.json``) would lose it.
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; name the .onnx file to write")
    if out.exists() and out.suffix.lower() != ".onnx":
        raise ExportError(f"{out}: exists and is not an .onnx file; exporting would replace it "
                          "(name a new file, or an earlier .onnx export to overwrite)")
    # Everything is written and verified under a temporary name next to ``out``, which is
    # replaced only by a graph that passed: a failed export or verification leaves any earlier
    # ``out`` as it was and no unverified (or half-written) file behind.
    try:
        with atomic_path(out) as temp:
            report = _export_and_verify(model, temp, fp16, opset, exporter, verify_batch_sizes, seed)
            if not report.passed:
                raise ExportError(
                    f"{out}: onnxruntime disagrees with PyTorch (max abs diff embedding "
                    f"{report.max_abs_diff_embedding:.3g}, norm {report.max_abs_diff_norm:.3g}, "
                    f"quality {report.max_abs_diff_quality:.3g}; tolerances "
                    f"{report.tolerance:.3g}, {report.tolerance_norm:.3g}, "
                    f"{report.tolerance_quality:.3g}); nothing written"
                )
    except FileWriteError as exc:
        raise ExportError(str(exc)) from None
    report.path = out
    return report


def _export_and_verify(model: Model, out: Path, fp16: bool, opset: int, exporter: str,
                       verify_batch_sizes: tuple[int, ...], seed: int) -> ExportReport:
    original_device = model.device
    model.to("cpu")  # export and reference run on CPU, the same place onnxruntime runs here
    try:
        module = _EmbedOutputs(_Float16Wrapper(model.module) if fp16 else model.module).eval()
        h, w = model.spec.input_size
        generator = torch.Generator().manual_seed(seed)
        example = model.preprocess(torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=generator))
        _check_finite_outputs(module, example, model, fp16)
        try:
            _export(module, example, out, opset, exporter)
        except Exception as exc:  # exporter internals raise anything; report it in one line
            raise ExportError(f"{exporter} ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        _attach_metadata(out, model, fp16)
        diff_embedding = diff_norm = diff_quality = 0.0
        norm_scale = quality_scale = 0.0
        for batch_size in verify_batch_sizes:
            images = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, generator=generator)
            d_e, d_n, d_q = compare_with_onnxruntime(out, model, images)
            diff_embedding, diff_norm = max(diff_embedding, d_e), max(diff_norm, d_n)
            diff_quality = max(diff_quality, d_q)
            with torch.no_grad():
                _, n, q = _EmbedOutputs(model.module)(model.preprocess(images))
            norm_scale = max(norm_scale, float(n.abs().max()))
            quality_scale = max(quality_scale, float(q.abs().max()))
    finally:
        model.to(original_device)
    # One tolerance from the largest of all outputs let the unit-norm embedding disagree by
    # 1% of the norm in fp16 (0.5 per component at a norm of 50, i.e. any direction at all) and
    # by 1e-5 of it in fp32: a graph with a wrong embedding passed. Each output gets its own.
    return ExportReport(out, opset, fp16, exporter, diff_embedding, diff_quality,
                        _tolerance(1.0, fp16), tuple(verify_batch_sizes), diff_norm,
                        onnx_conventions(model), tolerance_norm=_tolerance(norm_scale, fp16),
                        tolerance_quality=_tolerance(quality_scale, fp16))
