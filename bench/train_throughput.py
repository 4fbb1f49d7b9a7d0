#!/usr/bin/env python3
"""Training throughput: images/s, peak memory and MFU of the trainer's own optimizer step.

What is timed is ``Trainer.train_step``, the exact code ``qualiface train`` runs per step:
random flip, (QGFace: the degraded second view, both views through the backbone as one batch),
``uint8 -> (x/255 - 0.5)/0.5`` conversion, channels_last, backbone forward under autocast, the
head in fp32 over all ``--classes`` centres, backward, gradient clipping (as the method's shipped
config sets it), optimizer step (SGD with momentum, the trainer's weight-decay split). The
Trainer is built from a config like a real run (the method's ``configs/<head>_r50.yaml`` head
and pipeline sections, the requested backbone) and entered into the method's *last* phase, so
EQFace is timed in its step 3 (backbone + centres with the frozen quality branch as weights)
and QCFace with its norm regulariser on. Only the data differs: one batch of random uint8
images and labels already on the device, so the number is the compute ceiling of training.

Timing: ``--warmup`` steps first (cuDNN autotuning, ``torch.compile``), then ``--steps`` steps
bracketed by CUDA events without any synchronisation added by this script; the run is
synchronised once at the end. The trainer's step keeps its metrics on the device and reads
back one flag per step (all losses and the gradient norm finite?), which it must see before
``optimizer.step()``; the number of host syncs per step is measured with
``torch.cuda.set_sync_debug_mode`` and reported as ``host_syncs_per_step`` (CUDA only).

FLOPs: the backbone's forward FLOPs per image are counted with ``torch.utils.flop_counter``
(IResNet-50: 12.62 GFLOPs at 112x112, the usual ~12.6; IResNet-100: 24.18), plus the head's
logit product ``2 * D * C``; a training step is counted as 3x the forward (forward + backward
for activations and for weights), times 2 backbone passes for QGFace's second view. MFU is
that rate over the GPU's dense bf16/fp16 tensor-core peak (H100 SXM / H200: 989.4 TFLOP/s;
``--peak-tflops`` overrides). The InsightFace reference (arcface_torch, one H100, fp16 AMP):
2,425 img/s IResNet-50, 1,633 img/s IResNet-100.

``--from-rec PATH`` measures the end-to-end rate instead: a real ``Trainer.run()`` on a JPEG
``.rec`` streamed from disk by the trainer's DataLoader (``--workers``), rate read from its
``metrics.jsonl`` after the warm-up steps, plus the loader alone (decode + transfer, no model).

Writes ``bench/results/train_throughput.json`` (``--out``) and prints a table, with images/s (and
MFU) as bar charts beside the JSON (``.png``, same stem, and a ``.md`` with the table); ``--profile``
also writes a torch.profiler table of the top ops per (backbone, head).

    python bench/train_throughput.py                        # GPU: r50 + r100 x 5 heads, bf16
    python bench/train_throughput.py --precision fp16 --compile --profile
    python bench/train_throughput.py --from-rec /data/ms1m/train.rec --heads arcface
    python bench/train_throughput.py --smoke                # tiny sizes, CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    BenchError,
    fmt,
    markdown_table,
    merge,
    method_sections,
    parse_list,
    print_table,
    provenance,
    run_main,
    write_figures,
    write_json,
)

#: arcface_torch's published training speed on one H100 with fp16 AMP (images/s).
INSIGHTFACE_H100_FP16 = {"iresnet50": 2425.0, "iresnet100": 1633.0}
#: The commonly quoted forward cost at 112x112 (GFLOPs); we also count it ourselves.
REFERENCE_FORWARD_GFLOPS = {"iresnet50": 12.6}
#: Dense bf16/fp16 tensor-core peaks (TFLOP/s), matched against the GPU name, first hit wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
               ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))
#: forward + backward ~= 3 forwards (the backward computes input and weight gradients).
TRAIN_FLOPS_FACTOR = 3.0
DEFAULT_HEADS = ("arcface", "adaface", "qcface", "eqface", "qgface")
DEFAULT_BACKBONES = ("iresnet50", "iresnet100")
GLINT360K_CLASSES = 93_431  # MS1MV3's identity count, the usual single-GPU benchmark size
BENCH_DATASET = "bench-random-faces"
STEADY_STATE_STEP = 10**9  # passed to method.before_step: past every warm-up switch


@dataclass
class ThroughputConfig:
    """Everything one invocation measures (also stored in the JSON)."""

    backbones: list[str] = field(default_factory=lambda: list(DEFAULT_BACKBONES))
    heads: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))
    batch_size: int = 512
    classes: int = GLINT360K_CLASSES
    steps: int = 30
    warmup: int = 10
    device: str = "cuda"
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = False
    embedding_size: int = 512
    input_size: int = 112
    backbone_params: dict = field(default_factory=dict)
    peak_tflops: float | None = None
    profile: bool = False
    from_rec: str | None = None
    workers: int = 8
    smoke: bool = False
    threads: int | None = None
    out: str = ""


class RandomFaces:
    """A dataset stand-in with ``num_classes`` classes: the Trainer needs one to build the head.

    The timed steps never read it (their batch is generated on the device); items are
    deterministic random uint8 images in case something does.
    """

    def __init__(self, num_classes: int, size: int, image_size: int = 112) -> None:
        self.num_classes = int(num_classes)
        self.size = int(size)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        import torch

        generator = torch.Generator().manual_seed(int(index))
        image = torch.randint(0, 256, (3, self.image_size, self.image_size), dtype=torch.uint8,
                              generator=generator)
        return image, int(index) % self.num_classes


def register_random_faces() -> None:
    """Make ``bench-random-faces`` buildable by the Trainer's dataset registry (idempotent)."""
    from qualiface.data import DATASETS, _load_all

    _load_all()
    if BENCH_DATASET not in DATASETS:
        DATASETS.register(BENCH_DATASET)(RandomFaces)


def peak_tflops_for(gpu_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU from its name, or None when unknown (and on CPU)."""
    if not gpu_name:
        return None
    for key, peak in PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


# --------------------------------------------------------------------------- trainer setup


def trainer_config(cfg: ThroughputConfig, backbone: str, head: str, out_dir: str, *,
                   data: dict, steps: int, log_every: int):
    """The TrainingConfig of one measurement: the head's shipped method sections + our sizes."""
    from qualiface.config import from_dict

    sections, _ = method_sections(head)
    model_params = {"embedding_size": cfg.embedding_size, **cfg.backbone_params}
    if cfg.input_size != 112:
        model_params["input_size"] = cfg.input_size
    base = {
        "model": {"backbone": backbone, "params": model_params},
        "data": data,
        "val": {"kind": "none"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"kind": "constant"},
        "train": {"steps": steps, "batch_size": cfg.batch_size, "precision": cfg.precision,
                  "channels_last": cfg.channels_last, "compile": cfg.compile,
                  "device": cfg.device, "progress": cfg.from_rec is not None and not cfg.smoke,
                  "output_dir": out_dir, "log_every": log_every, "checkpoint_every": 0,
                  "eval_every": 0, "seed": 0},
    }
    data_dict = merge(base, sections)
    return from_dict(data_dict, source=f"throughput config ({backbone}, {head})")


def count_forward_flops(backbone, input_size: int, device) -> float:
    """Forward FLOPs of ``backbone`` per image (float), counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = backbone.training
    backbone.eval()
    x = torch.zeros(2, 3, input_size, input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(x)
    backbone.train(was_training)
    return counter.get_total_flops() / 2


def count_host_syncs(step) -> int | None:
    """How many times one call of ``step()`` blocks the host on the GPU (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def was_skipped(step_result) -> bool:
    """True for the trainer's ``SkippedStep`` (NaN/Inf loss or gradient), False for metrics."""
    from qualiface.train.loop import SkippedStep

    return isinstance(step_result, SkippedStep)


def time_steps(step, device, steps: int) -> tuple[list[float], float, int]:
    """Run ``step()`` ``steps`` times -> (per-step ms, total ms, skipped steps).

    On CUDA each step is bracketed by events and nothing synchronises until the end; on the CPU
    the wall clock is used.
    """
    import torch

    skipped = 0
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for i in range(steps):
            starts[i].record()
            skipped += was_skipped(step())
            ends[i].record()
        torch.cuda.synchronize(device)
        per_step = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return per_step, starts[0].elapsed_time(ends[-1]), skipped
    per_step = []
    begin = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        skipped += was_skipped(step())
        per_step.append(1000 * (time.perf_counter() - t0))
    return per_step, 1000 * (time.perf_counter() - begin), skipped


def write_profile(step, device, path: Path, steps: int = 3) -> Path:
    """torch.profiler over a few steps -> a text table of the top ops by self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {steps} training steps, sorted by {sort_by}\n{table}\n")
    return path


# --------------------------------------------------------------------------- measurements


def measure_synthetic(cfg: ThroughputConfig, backbone_name: str, head_name: str, out_dir: Path,
                      peak_tflops: float | None) -> dict:
    """Throughput of the trainer's step on device-resident random data for one combination."""
    import torch

    from qualiface.train.loop import Trainer
    from qualiface.train.optim import set_lr

    register_random_faces()
    with tempfile.TemporaryDirectory(prefix="qualiface-throughput-") as tmp:
        data = {"name": BENCH_DATASET, "cache": "never", "num_workers": 0,
                "params": {"num_classes": cfg.classes, "size": cfg.batch_size,
                           "image_size": cfg.input_size}}
        tcfg = trainer_config(cfg, backbone_name, head_name, tmp, data=data, steps=1, log_every=1)
        trainer = Trainer(tcfg, out_dir=tmp)
        device = trainer.device
        phase = trainer.method.phases()[-1]
        trainer.prepare_phase(phase, steps_per_epoch=1)
        trainer.method.before_step(phase, STEADY_STATE_STEP, trainer.head)
        set_lr(trainer.optimizer, phase.lr)

        generator = torch.Generator(device=device).manual_seed(0)
        shape = (cfg.batch_size, 3, cfg.input_size, cfg.input_size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
        labels = torch.randint(0, cfg.classes, (cfg.batch_size,), device=device,
                               generator=generator)
        batch = [(images, labels)]

        def step():
            return trainer.train_step(batch)

        views = 2 if trainer.method.second_view(images[:1], torch.Generator()) is not None else 1
        forward_flops = count_forward_flops(trainer.backbone, cfg.input_size, device)
        head_flops = 2.0 * trainer.backbone.embedding_size * cfg.classes
        train_flops = TRAIN_FLOPS_FACTOR * (views * forward_flops + head_flops)

        for _ in range(cfg.warmup):
            step()
        _synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_step, total_ms, skipped = time_steps(step, device, cfg.steps)
        images_per_s = cfg.steps * cfg.batch_size / (total_ms / 1000)
        result = {
            "backbone": backbone_name, "head": head_name, "phase": phase.name,
            "views_per_image": views,
            "images_per_s": images_per_s,
            "backbone_images_per_s": views * images_per_s,
            "step_ms_mean": statistics.fmean(per_step),
            "step_ms_median": statistics.median(per_step),
            "step_ms_max": max(per_step),
            "skipped_steps": skipped,
            "forward_gflops_per_image": forward_flops / 1e9,
            "reference_forward_gflops": REFERENCE_FORWARD_GFLOPS.get(backbone_name),
            "head_forward_gflops_per_image": head_flops / 1e9,
            "train_gflops_per_image": train_flops / 1e9,
            "achieved_tflops": images_per_s * train_flops / 1e12,
        }
        result["mfu"] = result["achieved_tflops"] / peak_tflops if peak_tflops else None
        reference = INSIGHTFACE_H100_FP16.get(backbone_name)
        result["insightface_h100_images_per_s"] = reference
        result["vs_insightface"] = images_per_s / reference if reference else None
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        result["host_syncs_per_step"] = count_host_syncs(step)
        if views == 2:  # the CPU degradation of QGFace's second view, on its own
            augment = torch.Generator().manual_seed(1)
            _synchronize(device)
            t0 = time.perf_counter()
            trainer.method.second_view(images, augment)
            _synchronize(device)
            result["second_view_ms"] = 1000 * (time.perf_counter() - t0)
        if cfg.profile:
            path = out_dir / f"train_profile_{backbone_name}_{head_name}.txt"
            result["profile"] = str(write_profile(step, device, path))
        trainer.logger.close()
    return result


def measure_from_rec(cfg: ThroughputConfig, backbone_name: str, head_name: str,
                     out_dir: Path) -> dict:
    """End-to-end rate of ``Trainer.run()`` on a ``.rec`` streamed from disk, plus the loader."""
    import torch

    from qualiface.train.data import BatchSource
    from qualiface.train.logging import read_metrics
    from qualiface.train.loop import Trainer

    rec = Path(cfg.from_rec)
    if not rec.exists():
        raise BenchError(f"{rec}: .rec file not found")
    with tempfile.TemporaryDirectory(prefix="qualiface-throughput-rec-") as tmp:
        data = {"name": "recordio", "params": {"path": str(rec)}, "cache": "never",
                "num_workers": cfg.workers}
        total = cfg.warmup + cfg.steps
        tcfg = trainer_config(cfg, backbone_name, head_name, tmp, data=data, steps=total,
                              log_every=1)
        trainer = Trainer(tcfg, out_dir=tmp)
        device = trainer.device
        plan = trainer.plan()
        # The loader alone: the same planned indices, decoded by the same workers, moved to
        # the device; tells whether the end-to-end rate is bound by JPEG decoding.
        source = BatchSource(trainer.dataset, plan, cache=None, device=device,
                             num_workers=cfg.workers)
        per_epoch = plan.steps_per_epoch
        for s in range(cfg.warmup):
            source.step(*divmod(s, per_epoch))
        _synchronize(device)
        t0 = time.perf_counter()
        for s in range(cfg.warmup, total):
            source.step(*divmod(s, per_epoch))
        _synchronize(device)
        loader_rate = cfg.steps * plan.step_size / (time.perf_counter() - t0)
        del source

        trainer.run()
        records = [r for r in read_metrics(Path(tmp) / "metrics.jsonl") if r.get("kind") == "train"]
        by_step = {int(r["step"]): float(r["time"]) for r in records}
        if cfg.warmup not in by_step or total not in by_step:
            raise BenchError(f"metrics.jsonl of the run lacks steps {cfg.warmup} and {total}")
        seconds = by_step[total] - by_step[cfg.warmup]
        num_classes = int(trainer.num_classes)
        del trainer
    return {
        "backbone": backbone_name, "head": head_name, "rec": str(rec),
        "num_classes": num_classes, "workers": cfg.workers,
        "end_to_end_images_per_s": cfg.steps * plan.step_size / seconds if seconds > 0 else None,
        "loader_only_images_per_s": loader_rate,
        "timed_steps": cfg.steps,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv) -> ThroughputConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    parser.add_argument("--heads", default=",".join(DEFAULT_HEADS))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=GLINT360K_CLASSES)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="autocast dtype of the backbone (fp16 uses the GradScaler)")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (the trainer leaves it off)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="accelerator peak for MFU (default: from the GPU name)")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler table per combination")
    parser.add_argument("--from-rec", default=None, metavar="PATH",
                        help="measure end to end from a JPEG .rec on disk with the real loader")
    parser.add_argument("--workers", type=int, default=8, help="loader workers for --from-rec")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (iresnet-nano, 32 px, batch 8, 2 steps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/...)")
    args = parser.parse_args(argv)
    cfg = ThroughputConfig(
        backbones=parse_list(args.backbones, what="--backbones"),
        heads=parse_list(args.heads, what="--heads"),
        batch_size=args.batch_size, classes=args.classes, steps=args.steps, warmup=args.warmup,
        device=args.device, precision=args.precision, channels_last=not args.no_channels_last,
        compile=args.compile, cudnn_benchmark=args.cudnn_benchmark, peak_tflops=args.peak_tflops,
        profile=args.profile, from_rec=args.from_rec, workers=args.workers, smoke=args.smoke,
        threads=args.threads,
    )
    if args.smoke:
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        smoke = {"--backbones": ("backbones", ["iresnet-nano"]), "--batch-size": ("batch_size", 8),
                 "--classes": ("classes", 100), "--steps": ("steps", 2),
                 "--warmup": ("warmup", 1), "--device": ("device", "cpu"),
                 "--precision": ("precision", "fp32"), "--workers": ("workers", 0),
                 "--threads": ("threads", 1)}
        for flag, (name, value) in smoke.items():
            if flag not in explicit:
                setattr(cfg, name, value)
        cfg.embedding_size, cfg.input_size = 64, 32
        cfg.backbone_params = {"base_width": 8}
    for name in ("batch_size", "classes", "steps", "warmup"):
        if getattr(cfg, name) < (0 if name == "warmup" else 1):
            flag = "--" + name.replace("_", "-")
            raise BenchError(f"{flag} must be positive, got {getattr(cfg, name)}")
    cfg.out = args.out or str(RESULTS_DIR / (
        "train_throughput_smoke.json" if args.smoke else "train_throughput.json"))
    return cfg


def main(argv=None) -> dict:
    import torch

    from qualiface.devices import DeviceError, parse_device

    cfg = parse_args(argv)
    out_path = Path(cfg.out)
    try:
        parse_device(cfg.device)
    except DeviceError as exc:
        raise BenchError(f"--device: {exc} (use --device cpu, or --smoke for a CPU smoke run)") from None
    if cfg.precision == "fp16" and not cfg.device.startswith("cuda"):
        raise BenchError("--precision fp16 needs a CUDA device")
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.threads:
        # One thread on a shared CPU: OpenMP workers spinning for busy cores cost 10-100x.
        torch.set_num_threads(cfg.threads)
    header = provenance(cfg.device)
    gpu = header["machine"].get("gpu") if cfg.device.startswith("cuda") else None
    peak = cfg.peak_tflops or peak_tflops_for(gpu)
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
    payload = {
        "benchmark": "train_throughput", **header,
        "settings": settings,
        "flops_note": ("train FLOPs/image = 3 x (views x counted backbone forward + 2*D*C head "
                       "logits); MFU = achieved / peak dense bf16 tensor-core TFLOP/s"),
        "peak_tflops": peak,
        "reference": {"insightface_h100_fp16_images_per_s": INSIGHTFACE_H100_FP16,
                      "forward_gflops": REFERENCE_FORWARD_GFLOPS},
        "results": [],
    }
    results_dir = out_path.parent
    for backbone in cfg.backbones:
        for head in cfg.heads:
            label = f"{backbone} / {head}"
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            try:
                if cfg.from_rec:
                    entry = measure_from_rec(cfg, backbone, head, results_dir)
                else:
                    entry = measure_synthetic(cfg, backbone, head, results_dir, peak)
            except torch.cuda.OutOfMemoryError as exc:
                entry = {"backbone": backbone, "head": head,
                         "error": f"out of GPU memory: {str(exc).splitlines()[0]}"}
            payload["results"].append(entry)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            write_json(out_path, payload)  # after every combination: a crash keeps the rest
    title, header, rows = print_summary(payload, bool(cfg.from_rec))
    print(f"wrote {out_path}", file=sys.stderr)
    figures = write_figures(out_path, title, figure_panels(payload, bool(cfg.from_rec)),
                            markdown_table(header, rows))
    if figures:
        print(f"wrote {figures[0]} and {figures[1]}", file=sys.stderr)
    return payload


def figure_panels(payload: dict, from_rec: bool) -> list[tuple]:
    """Images/s (and MFU) per backbone / head for ``write_figures``."""
    rows = [r for r in payload["results"] if "error" not in r]
    if from_rec:
        return [("images/s", {f"{r['backbone']} / {r['head']}": {
            "end-to-end": r.get("end_to_end_images_per_s"),
            "loader only": r.get("loader_only_images_per_s")} for r in rows}, False)]
    labels = [f"{r['backbone']} / {r['head']} ({r['phase']})" for r in rows]
    return [("images/s", {k: r["images_per_s"] for k, r in zip(labels, rows)}, False),
            ("MFU %", {k: None if r.get("mfu") is None else 100 * r["mfu"]
                       for k, r in zip(labels, rows)}, False)]


def print_summary(payload: dict, from_rec: bool) -> tuple[str, list[str], list[list[str]]]:
    """Print the table; return its (title, header, rows)."""
    rows = []
    if from_rec:
        header = ["backbone", "head", "classes", "end-to-end img/s", "loader-only img/s", "workers"]
        for r in payload["results"]:
            rows.append([r["backbone"], r["head"], fmt(r.get("num_classes")),
                         fmt(r.get("end_to_end_images_per_s"), 1),
                         fmt(r.get("loader_only_images_per_s"), 1), fmt(r.get("workers"))])
    else:
        header = ["backbone", "head", "phase", "img/s", "step ms", "peak GiB", "TFLOP/s", "MFU %",
                  "x InsightFace", "syncs/step"]
        for r in payload["results"]:
            if "error" in r:
                rows.append([r["backbone"], r["head"], r["error"], *["-"] * 7])
                continue
            rows.append([r["backbone"], r["head"], r["phase"], fmt(r["images_per_s"], 1),
                         fmt(r["step_ms_median"], 1), fmt(r.get("peak_memory_gib"), 2),
                         fmt(r["achieved_tflops"], 1), fmt(r["mfu"], percent=True),
                         fmt(r["vs_insightface"], 2), fmt(r["host_syncs_per_step"])])
    s = payload["settings"]
    title = (f"training throughput: batch {s['batch_size']}, {s['classes']:,} classes, "
             f"{s['precision']}, {payload['machine'].get('gpu', payload['machine']['cpu'])}")
    print_table(title, header, rows)
    return title, header, rows


if __name__ == "__main__":
    sys.exit(run_main(main))
