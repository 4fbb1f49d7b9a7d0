#!/usr/bin/env python3
"""The real-face benchmark: every method trained identically on ``train.txt``, tested on LFW 8-10.

Protocol (``../shared/data/README.md``, kept fixed):

* **Train** on ``train.txt`` (list dataset; 18,976 images, 4,735 identities, no test identity).
  Every method gets the same backbone, optimiser, schedule, seed and therefore the same data
  order and backbone initialisation: the shared part is ``configs/bench/real_faces.yaml``; only
  the ``head`` and ``pipeline`` sections differ, taken from the method's shipped
  ``configs/<method>_r50.yaml``. Phases a method adds (EQFace's steps 2 and 3, QCFace's warm-up)
  keep their shipped length *relative* to the main schedule (EQFace: +1/6 + 1/6 of it).
* **Test** on LFW ``pairs.txt`` folds 8, 9, 10 (1,800 pairs): accuracy as 3-fold
  cross-validation over those folds (threshold from two folds, applied to the third; mean and
  std), TAR at FAR = 1e-2 and ROC AUC over all pairs.
* **Degraded test**: the same pairs on degraded copies of every test image. Each image gets one
  degradation kind drawn uniformly (seed ``DEGRADE_SEED``) from ``qualiface.data.degrade``'s
  seven kinds (occlusion, motion blur, Gaussian blur, low light, noise, down-up sampling, JPEG),
  the same kind at every severity, applied at severity 0.25, 0.5 and 0.75 (``--severities``).
* **Quality**: EDC (threshold fixed at FMR 1e-2, lowest pair quality discarded first) pAUC at
  20 % and 30 % discard for each method's own quality score and for its feature norm, on the
  *mixed* set where every image appears at one severity drawn uniformly from {0, 0.25, 0.5,
  0.75} (seed ``MIX_SEED``), i.e. where quality varies; the clean-set EDC is in the JSON too.
  Spearman correlation of quality with severity over every test image at every level (a good
  score is strongly negative).

Metrics come from ``qualiface.eval`` (``lfw_benchmark``, ``extract_features``,
``evaluate_pairs``, ``rank_correlations``) over the model package the trainer writes
(``qualiface.infer.model``); nothing is recomputed here. ``--seeds 0,1,2`` repeats every method
per seed and reports mean +- std (sample std over seeds).

Writes ``bench/results/real_faces.json``, ``real_faces.md`` (the table for
``docs/BENCHMARKS.md``) and ``real_faces_edc.png``; prints the table.

    python bench/real_faces.py --backbone iresnet18 --epochs 20 --seeds 0,1,2      # GPU
    python bench/real_faces.py --smoke                                            # CPU, 1 min
    python bench/real_faces.py --merge a.json b.json --out bench/results/real_faces.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    SHARED_DATA,
    BenchError,
    fmt,
    markdown_table,
    merge,
    method_sections,
    parse_list,
    print_table,
    provenance,
    run_main,
    write_json,
)

METHODS = ("arcface", "cosface", "magface", "adaface", "qcface", "qcface-cur", "eqface", "qgface")
BASE_CONFIG = REPO / "configs" / "bench" / "real_faces.yaml"
TEST_FOLDS = (8, 9, 10)
DEGRADE_SEED = 2024  # which kind each test image gets, and the kinds' own randomness
MIX_SEED = 7  # which severity each image has in the mixed set
FAR = 1e-2
EDC_FMR = 1e-2
DISCARD_LIMITS = (0.2, 0.3)


@dataclass
class RealFacesConfig:
    """One invocation (stored in the JSON). ``max_steps > 0`` replaces ``epochs`` by a step
    budget; ``train_identities`` / ``test_pairs_per_fold`` > 0 take deterministic subsets."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    backbone: str = "iresnet50"
    backbone_params: dict = field(default_factory=dict)
    epochs: float = 20.0
    max_steps: int = 0
    batch_size: int = 128
    device: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0])
    severities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    data: str = str(SHARED_DATA)
    train_identities: int = 0
    test_pairs_per_fold: int = 0
    workers: int = 8
    threads: int | None = None
    embed_batch: int = 256
    overrides: list[str] = field(default_factory=list)
    runs_dir: str = "runs/bench_real_faces"
    out: str = ""
    smoke: bool = False
    merge: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data


class TensorImages:
    """A uint8 (N, 3, H, W) tensor as a dataset of images (what ``extract_features`` reads)."""

    def __init__(self, images) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index]


def check_data(root: Path) -> None:
    """Fail early, naming the file, when the shared data folder is incomplete."""
    for rel in ("train.txt", "lfw/pairs.txt", "lfw/aligned112"):
        if not (root / rel).exists():
            raise BenchError(f"{root / rel}: not found (--data must be the shared data folder "
                             f"described in ../shared/data/README.md)")


def train_subset_list(data_root: Path, identities: int, out_file: Path) -> Path:
    """A ``train.txt`` subset of ``identities`` identities with >= 2 images (fixed seed 0),
    labels renumbered 0..identities-1; paths stay relative to ``data_root``."""
    import numpy as np

    from qualiface.data.folder import parse_list_file

    source = data_root / "train.txt"
    lines = [ln.rsplit(None, 1) for ln in source.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    parse_list_file(source, data_root)  # the same validation a real run gets, naming bad lines
    by_label: dict[int, list[str]] = {}
    for rel, label in lines:
        by_label.setdefault(int(label), []).append(rel)
    eligible = sorted(k for k, v in by_label.items() if len(v) >= 2)
    if identities > len(eligible):
        raise BenchError(f"{source}: asked for {identities} identities, only {len(eligible)} "
                         f"have two or more images")
    chosen = sorted(np.random.default_rng(0).choice(eligible, identities, replace=False).tolist())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text("".join(f"{rel} {new}\n" for new, old in enumerate(chosen)
                                for rel in by_label[old]))
    return out_file


def test_benchmark(data_root: Path, pairs_per_fold: int):
    """LFW folds 8-10 as a ``PairBenchmark``; ``pairs_per_fold`` > 0 keeps the first half
    genuine and half impostor pairs of each fold (file order) for quick runs."""
    import numpy as np

    from qualiface.eval.benchmarks import PairBenchmark, lfw_benchmark
    from qualiface.eval.features import ImageFiles

    bench = lfw_benchmark(data_root / "lfw", data_root / "lfw" / "pairs.txt", folds=TEST_FOLDS,
                          name="LFW folds 8-10")
    bench.folds = np.asarray(bench.folds)
    if pairs_per_fold <= 0:
        return bench
    keep = []
    for fold in np.unique(bench.folds):
        for genuine in (True, False):
            rows = np.flatnonzero((bench.folds == fold) & (bench.labels == genuine))
            keep.extend(rows[: max(1, pairs_per_fold // 2)].tolist())
    keep = np.array(sorted(keep))
    used = np.unique(np.concatenate([bench.first[keep], bench.second[keep]]))
    remap = np.full(len(bench.ids), -1)
    remap[used] = np.arange(len(used))
    return PairBenchmark(f"{bench.name} (subset: {pairs_per_fold} pairs/fold)",
                         ImageFiles([bench.images.paths[i] for i in used]),
                         [bench.ids[i] for i in used], remap[bench.first[keep]],
                         remap[bench.second[keep]], bench.labels[keep], bench.folds[keep],
                         bench.source)


def decode_images(dataset, progress: bool = True):
    """Every image of a dataset as one uint8 (N, 3, H, W) tensor (decoded once, reused)."""
    import torch

    from qualiface.progress import make_progress

    images = []
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("decoding test images", total=len(dataset))
        for i in range(len(dataset)):
            images.append(dataset[i])
            bar.update(task, completed=i + 1)
    return torch.stack(images)


# --------------------------------------------------------------------------- configs


def run_config(cfg: RealFacesConfig, method: str, seed: int, list_file: Path, data_root: Path,
               out_dir: Path):
    """The TrainingConfig of one (method, seed): base file + method sections + flags."""
    import yaml

    from qualiface.config import apply_overrides, from_dict

    base = yaml.safe_load(BASE_CONFIG.read_text())
    sections, shipped_epochs = method_sections(method)
    method_part = {k: v for k, v in sections.items() if k in ("head", "pipeline")}
    if "pipeline" in method_part:
        method_part["pipeline"] = rescale_phases(method_part["pipeline"], shipped_epochs, cfg)
    merged = merge(base, method_part)
    merged["model"]["backbone"] = cfg.backbone
    merged["model"]["params"] = merge(merged["model"].get("params", {}), cfg.backbone_params)
    merged["data"]["params"] = {"list_file": str(list_file), "root": str(data_root)}
    merged["data"]["num_workers"] = cfg.workers
    train = merged["train"]
    train.update(batch_size=cfg.batch_size, device=cfg.device, seed=seed,
                 output_dir=str(out_dir), progress=True)
    if cfg.max_steps > 0:
        train["steps"] = cfg.max_steps
        merged["schedule"]["warmup_steps"] = max(1, cfg.max_steps // 20)
    else:
        train["epochs"] = cfg.epochs
    merged = apply_overrides(merged, cfg.overrides)
    return from_dict(merged, source=f"{BASE_CONFIG} + {method} (seed {seed})")


def rescale_phases(pipeline: dict, shipped_epochs: float | None, cfg: RealFacesConfig) -> dict:
    """Keep each ``*_epochs`` phase length of a pipeline at its shipped share of the schedule.

    With a step budget the share becomes the sibling ``*_steps`` (at least 1 step).
    """
    if not shipped_epochs:
        return pipeline
    out = {}
    for name, section in pipeline.items():
        if not isinstance(section, dict):
            out[name] = section
            continue
        section = dict(section)
        for key, value in list(section.items()):
            if key.endswith("_epochs") and isinstance(value, (int, float)):
                share = float(value) / shipped_epochs
                if cfg.max_steps > 0:
                    steps_key = key[: -len("_epochs")] + "_steps"
                    section[steps_key] = max(1, round(share * cfg.max_steps))
                else:
                    section[key] = share * cfg.epochs
        out[name] = section
    return out


# --------------------------------------------------------------------------- evaluation


def _edc_entry(quality_metrics: dict) -> tuple[float | None, dict]:
    """(fmr used, summary) of the first EDC in one quality entry of ``evaluate_pairs``."""
    for key, value in quality_metrics.items():
        if key.startswith("fmr_"):
            return value["fmr"], value
    return None, {}


def summarise(metrics: dict) -> dict:
    """The numbers the table shows, from one ``evaluate_pairs`` metrics dict."""
    verification = metrics["verification"]
    out = {"accuracy": verification.get("accuracy"),
           "accuracy_std": verification.get("accuracy_std"),
           "tar_at_far_1e-2": verification["tar_at_far"].get("1e-02"),
           "auc": verification["auc"]}
    for name, key in (("model quality", "quality"), ("feature norm", "norm")):
        fmr, edc = _edc_entry(metrics["quality"].get(name, {}))
        out[f"{key}_edc_fmr"] = fmr
        for limit in DISCARD_LIMITS:
            out[f"{key}_pauc_{round(100 * limit)}"] = edc.get(f"pauc_{round(100 * limit)}")
        severity = metrics["quality"].get(name, {}).get("vs_severity")
        if severity:
            out[f"{key}_spearman_mixed"] = severity["spearman"]
    return out


def evaluate_package(package: Path, bench, clean, degraded: dict, device: str,
                     cfg: RealFacesConfig, label: str) -> dict:
    """Embed the clean and degraded test images with a model package and score everything."""
    import numpy as np

    from qualiface.eval.benchmarks import evaluate_pairs
    from qualiface.eval.features import FeatureSet, extract_features
    from qualiface.infer.model import package_embed_fn
    from qualiface.eval.quality import rank_correlations
    from qualiface.eval.similarity import row_norms

    embed_fn, model_id = package_embed_fn(package, device=device)
    levels = {0.0: clean, **degraded}
    features = {}
    for severity, images in levels.items():
        features[severity] = extract_features(
            TensorImages(images), embed_fn, ids=bench.ids, batch_size=cfg.embed_batch,
            description=f"{label} severity {severity:g}", meta={"model": model_id})
    kwargs = {"fars": (FAR,), "edc_fmrs": (EDC_FMR,)}
    results = {}
    for severity, fs in features.items():
        result = evaluate_pairs(bench, fs, **kwargs)
        results[f"severity_{severity:g}"] = {"metrics": result.metrics,
                                             "summary": summarise(result.metrics)}
    # Mixed set: each image at one severity level, so the quality scores have something to rank.
    order = sorted(features)
    assigned = np.random.default_rng(MIX_SEED).integers(len(order), size=len(bench.ids))
    stacked_f = np.stack([features[s].features for s in order])
    stacked_q = np.stack([features[s].quality for s in order])
    rows = np.arange(len(bench.ids))
    mixed = FeatureSet(bench.ids, stacked_f[assigned, rows], stacked_q[assigned, rows],
                       {"mixed_levels": order})
    severity_of_image = np.asarray(order)[assigned]
    result = evaluate_pairs(bench, mixed, severity=severity_of_image, **kwargs)
    results["mixed"] = {"metrics": result.metrics, "summary": summarise(result.metrics)}
    # Kept as lists in the JSON so --merge can redraw the plot from result files alone.
    edcs = {name: (curve.discard_fractions.tolist(), curve.errors.tolist())
            for name, curve in result.edcs.items()}
    # Pooled over every image at every level: how well each score orders by damage.
    all_quality = np.concatenate([features[s].quality for s in order])
    all_norms = np.concatenate([row_norms(features[s].features) for s in order])
    all_severity = np.repeat(np.asarray(order), len(bench.ids))
    results["spearman_vs_severity"] = {
        "model quality": rank_correlations(all_quality, all_severity),
        "feature norm": rank_correlations(all_norms, all_severity),
    }
    return {"results": results, "edcs": edcs}


# --------------------------------------------------------------------------- one run


def train_and_evaluate(cfg: RealFacesConfig, method: str, seed: int, list_file: Path,
                       data_root: Path, bench, clean, degraded, eval_device: str) -> dict:
    from qualiface.train.loop import TrainingError, train

    out_dir = Path(cfg.runs_dir) / f"{method}-seed{seed}"
    tcfg = run_config(cfg, method, seed, list_file, data_root, out_dir)
    started = time.perf_counter()
    try:
        result = train(tcfg)
    except TrainingError as exc:
        return {"method": method, "seed": seed, "error": str(exc)}
    train_seconds = time.perf_counter() - started
    if result.model_package is None:
        raise BenchError(f"{out_dir}: the trainer wrote no model package")
    evaluation = evaluate_package(result.model_package, bench, clean, degraded, eval_device,
                                  cfg, f"{method} s{seed}")
    last = {k: v for k, v in result.last_metrics.items() if isinstance(v, (int, float))}
    return {"method": method, "seed": seed, "run_dir": str(out_dir),
            "train": {"steps": result.global_step, "seconds": train_seconds,
                      "last_metrics": last},
            **evaluation}


# --------------------------------------------------------------------------- aggregation


def table_columns(severities: list[float]) -> list[tuple[str, str, bool]]:
    """(header, key path "set:field", percent?) of the table, in order."""
    cols = [("acc %", "severity_0:accuracy", True),
            ("TAR@FAR1e-2 %", "severity_0:tar_at_far_1e-2", True),
            ("AUC", "severity_0:auc", False)]
    cols += [(f"acc % s{s:g}", f"severity_{s:g}:accuracy", True) for s in severities]
    cols += [("pAUC20 q", "mixed:quality_pauc_20", False),
             ("pAUC30 q", "mixed:quality_pauc_30", False),
             ("pAUC20 norm", "mixed:norm_pauc_20", False),
             ("pAUC30 norm", "mixed:norm_pauc_30", False),
             ("rho q", "spearman:model quality", False),
             ("rho norm", "spearman:feature norm", False)]
    return cols


def column_value(run: dict, path: str):
    part, key = path.split(":", 1)
    results = run["results"]
    if part == "spearman":
        return results["spearman_vs_severity"][key]["spearman"]
    return results[part]["summary"].get(key)


def aggregate(runs: list[dict], methods: list[str], severities: list[float]) -> dict:
    """Per method and column: mean and std over seeds (sample std; 0 for one seed)."""
    out = {}
    for method in methods:
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        entry = {"seeds": [r["seed"] for r in ok],
                 "errors": [r["error"] for r in runs if r["method"] == method and "error" in r]}
        for header, path, _ in table_columns(severities):
            values = [column_value(r, path) for r in ok]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[path] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
        out[method] = entry
    return out


def table_rows(summary: dict, methods: list[str], severities: list[float]) -> tuple[list, list]:
    columns = table_columns(severities)
    header = ["method"] + [c[0] for c in columns]
    rows = []
    for method in methods:
        entry = summary[method]
        row = [method]
        for _, path, percent in columns:
            value = entry.get(path)
            if value is None:
                row.append("-")
                continue
            text = fmt(value["mean"], 3, percent=percent)
            if value["n"] > 1:
                text += " ± " + fmt(value["std"], 3, percent=percent)
            row.append(text)
        rows.append(row)
    return header, rows


def write_markdown(path: Path, payload: dict, header, rows) -> Path:
    s = payload["settings"]
    schedule = (f"{s['max_steps']} steps" if s["max_steps"] > 0 else f"{s['epochs']:g} epochs")
    if s["smoke"]:
        scale = "CPU smoke scale, not the benchmark"
    elif "gpu" not in payload["machine"]:
        scale = "CPU scale, not the benchmark"
    else:
        scale = "benchmark run"
    lines = [
        f"### Real-face protocol ({scale})\n",
        f"{s['backbone']}, {schedule}, batch {s['batch_size']}, seeds {s['seeds']}; "
        f"train: {payload['train_set']}; test: {payload['test_set']}; "
        f"{payload['machine'].get('gpu', payload['machine']['cpu'])}, torch {payload['torch']}, "
        f"{payload['date']}.\n",
        f"Accuracy: 3-fold CV over LFW folds 8-10; TAR at FAR 1e-2 and AUC over all pairs (clean). "
        f"`acc % sX`: the same pairs with every image degraded at severity X (one of seven kinds "
        f"per image, seed {DEGRADE_SEED}). pAUC: EDC at FMR 1e-2 up to 20 % / 30 % discard on "
        f"the mixed-severity set (lower is better) for the method's quality score (q) and its "
        f"feature norm. rho: Spearman of the score vs severity over all images and levels "
        f"(more negative is better). Mean ± sample std over seeds.\n",
        markdown_table(header, rows),
    ]
    path.write_text("\n".join(lines))
    return path


def plot_edcs(path: Path, runs: list[dict], methods: list[str]) -> Path | None:
    """One EDC per method (first seed) for its quality score and, dashed, its feature norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qualiface.eval.report import draw_edcs

    panels = {"model quality": {}, "feature norm": {}}  # score -> method -> curve
    for method in methods:
        run = next((r for r in runs if r["method"] == method and "error" not in r), None)
        if run is None:
            continue
        for prefix, curves in panels.items():
            for name, curve in run.get("edcs", {}).items():
                if name.startswith(prefix):
                    curves[method] = curve
    if not any(panels.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    titles = ("method's quality score", "feature norm")
    for ax, curves, title in zip(axes, panels.values(), titles):
        draw_edcs(ax, curves, f"EDC, mixed-severity LFW 8-10: {title}",
                  ylabel=f"FNMR at FMR {EDC_FMR:g}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI


def parse_args(argv) -> RealFacesConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--backbone", default="iresnet50",
                        help="iresnet18 / iresnet50 (iresnet-nano for CPU runs)")
    parser.add_argument("--backbone-param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra backbone constructor argument, e.g. base_width=8")
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="a step budget instead of --epochs (same for every method)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--severities", default="0.25,0.5,0.75")
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--train-identities", type=int, default=0,
                        help="train on this many identities (with >= 2 images) only; 0 = all")
    parser.add_argument("--test-pairs-per-fold", type=int, default=0,
                        help="use this many pairs of each test fold only; 0 = all 600")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="config override for every run, e.g. optim.lr=0.05")
    parser.add_argument("--runs-dir", default=None, help="where the runs are written")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/...)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="only combine earlier result files into one table (no training)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke: iresnet-nano, 2 steps, 12 identities, 8 pairs per fold")
    args = parser.parse_args(argv)
    from qualiface.config import parse_override

    cfg = RealFacesConfig(
        methods=parse_list(args.methods, what="--methods"), backbone=args.backbone,
        backbone_params=dict(parse_override(p) for p in args.backbone_param),
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        device=args.device, seeds=parse_list(args.seeds, int, what="--seeds"),
        severities=parse_list(args.severities, float, what="--severities"), data=args.data,
        train_identities=args.train_identities, test_pairs_per_fold=args.test_pairs_per_fold,
        workers=args.workers, threads=args.threads, embed_batch=args.embed_batch,
        overrides=args.overrides, smoke=args.smoke, merge=args.merge,
    )
    if args.smoke:
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        defaults = {"--backbone": ("backbone", "iresnet-nano"), "--max-steps": ("max_steps", 2),
                    "--batch-size": ("batch_size", 16), "--device": ("device", "cpu"),
                    "--train-identities": ("train_identities", 12),
                    "--test-pairs-per-fold": ("test_pairs_per_fold", 8),
                    "--workers": ("workers", 0), "--threads": ("threads", 1),
                    "--embed-batch": ("embed_batch", 64)}
        for flag, (name, value) in defaults.items():
            if flag not in explicit:
                setattr(cfg, name, value)
        if cfg.backbone == "iresnet-nano" and "--backbone-param" not in explicit:
            cfg.backbone_params = {"embedding_size": 64, "base_width": 8}
    unknown = [m for m in cfg.methods if not (REPO / "configs" / f"{m}_r50.yaml").is_file()]
    if unknown:
        raise BenchError(f"--methods: no configs/<method>_r50.yaml for {', '.join(unknown)} "
                         f"(known: {', '.join(METHODS)})")
    if any(not 0 < s <= 1 for s in cfg.severities):
        raise BenchError(f"--severities must be in (0, 1], got {cfg.severities}")
    if cfg.batch_size < 1 or cfg.epochs <= 0 or cfg.max_steps < 0:
        raise BenchError("--batch-size and --epochs must be positive, --max-steps >= 0")
    suffix = "_smoke" if cfg.smoke else ""
    cfg.out = args.out or str(RESULTS_DIR / f"real_faces{suffix}.json")
    cfg.runs_dir = args.runs_dir or f"runs/bench_real_faces{suffix}"
    return cfg


def main(argv=None) -> dict:
    import torch

    cfg = parse_args(argv)
    if cfg.merge:
        return merge_results(cfg)
    if cfg.threads:
        # One thread on a shared CPU: OpenMP workers spinning for busy cores cost 10-100x.
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {cfg.device} but CUDA is not available here")
    eval_device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    data_root = Path(cfg.data).resolve()
    check_data(data_root)
    out_path = Path(cfg.out)
    runs_dir = Path(cfg.runs_dir)
    list_file = data_root / "train.txt"
    train_set = "train.txt (all 18,976 images)"
    if cfg.train_identities > 0:
        list_file = train_subset_list(data_root, cfg.train_identities,
                                      runs_dir / "train_subset.txt")
        train_set = f"train.txt subset: {cfg.train_identities} identities with >= 2 images (seed 0)"
    bench = test_benchmark(data_root, cfg.test_pairs_per_fold)
    clean = decode_images(bench.images)
    from qualiface.data.degrade import degraded_copies

    degraded, kinds = degraded_copies(clean, cfg.severities, seed=DEGRADE_SEED)
    header_info = provenance(eval_device)
    payload = {
        "benchmark": "real_faces", **header_info,
        "settings": asdict(cfg),
        "train_set": train_set,
        "test_set": f"{bench.name}: {len(bench.labels)} pairs, {len(bench.ids)} images",
        "protocol": {"test_folds": list(TEST_FOLDS), "far": FAR, "edc_fmr": EDC_FMR,
                     "discard_limits": list(DISCARD_LIMITS), "severities": cfg.severities,
                     "degrade_seed": DEGRADE_SEED, "mix_seed": MIX_SEED,
                     "kinds_count": {k: kinds.count(k) for k in sorted(set(kinds))}},
        "runs": [],
    }
    for seed in cfg.seeds:
        for method in cfg.methods:
            print(f"== {method} (seed {seed})", file=sys.stderr, flush=True)
            run = train_and_evaluate(cfg, method, seed, list_file, data_root, bench, clean,
                                     degraded, eval_device)
            payload["runs"].append(run)
            write_json(out_path, payload)  # progress survives a crash
    return finish(payload, out_path, cfg.methods, cfg.severities)


def finish(payload: dict, out_path: Path, methods: list[str], severities: list[float]) -> dict:
    """Aggregate over seeds, write JSON + Markdown + EDC plot, print the table."""
    payload["summary"] = aggregate(payload["runs"], methods, severities)
    header, rows = table_rows(payload["summary"], methods, severities)
    stem = out_path.with_suffix("")
    payload["markdown"] = str(write_markdown(stem.with_suffix(".md"), payload, header, rows))
    plot = plot_edcs(stem.parent / f"{stem.name}_edc.png", payload["runs"], methods)
    payload["edc_plot"] = str(plot) if plot else None
    write_json(out_path, payload)
    s = payload["settings"]
    scale = "" if "gpu" in payload["machine"] else " (CPU scale, not the benchmark)"
    print_table(f"real-face protocol: {s['backbone']}{scale}", header, rows)
    print(f"wrote {out_path}, {payload['markdown']}, {payload['edc_plot']}", file=sys.stderr)
    return payload


def merge_results(cfg: RealFacesConfig) -> dict:
    """Combine the runs of several result files (e.g. methods run in separate jobs) into one
    table; the settings must agree apart from the method list and seeds."""
    import json

    payloads = []
    for path in cfg.merge:
        try:
            payloads.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchError(f"{path}: cannot read a real_faces result ({exc})") from None
    ignore = {"methods", "seeds", "out", "runs_dir", "merge", "overrides"}
    first = payloads[0]
    for path, other in zip(cfg.merge[1:], payloads[1:]):
        a = {k: v for k, v in first["settings"].items() if k not in ignore}
        b = {k: v for k, v in other["settings"].items() if k not in ignore}
        if a != b:
            differ = sorted(k for k in a if a.get(k) != b.get(k))
            raise BenchError(f"{path}: settings differ from {cfg.merge[0]} in {', '.join(differ)}")
    runs = [run for p in payloads for run in p["runs"]]
    present = {r["method"] for r in runs}
    methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
    settings = {**first["settings"], "methods": methods,
                "seeds": sorted({r["seed"] for r in runs}), "merge": list(cfg.merge)}
    payload = {**first, "settings": settings, "runs": runs, "merged_from": list(cfg.merge)}
    return finish(payload, Path(cfg.out), methods, settings["severities"])


if __name__ == "__main__":
    sys.exit(run_main(main))
