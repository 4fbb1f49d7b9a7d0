#!/usr/bin/env python3
"""The real-face benchmark: every method trained identically on ``train.txt``, tested on LFW 8-10.

Protocol (``../shared/data/README.md``, kept fixed):

* **Train** on ``train.txt`` (list dataset; 18,976 images, 4,735 identities, no test identity).
  Every method gets the same backbone, data, optimiser, schedule and seed (so the same data
  order and backbone initialisation): ``configs/bench/real_faces.yaml`` fixes those. Everything
  else is the method's *whole* shipped config ``configs/<method>_r50.yaml``: its head, its
  pipeline, its model parameters (e.g. QCFace's and MagFace's ``learnable_embedding_scale``)
  and its training options (clipping, precision). Phases a method adds (EQFace's steps 2 and 3,
  QCFace's warm-up) keep their shipped length *relative* to the main schedule. The effective
  config of every run is printed and stored in its result file.
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
  Spearman and Kendall correlation of quality with severity over every test image at every level
  (a good score is strongly negative).

Runs are resumable and their results merge across sessions: each (method, seed) writes one
JSON (config, commit, the commit of each start and resume of its training, machine, date,
metrics) to ``--results-dir``; a run whose file exists is skipped, and a killed run resumes from
its last checkpoint in ``--runs-dir``. ``--table DIR`` only merges the run files of a folder into
``table.md`` / ``table.json`` and draws the EDC and quality-vs-severity plots. ``--preset cpu``
is the 2-core CPU protocol of ``docs/BENCHMARKS.md``.

    python bench/real_faces.py --preset cpu --methods qcface --seeds 0     # one row, CPU
    python bench/real_faces.py --table bench/results/real_faces_cpu        # the table + plots
    python bench/real_faces.py --backbone iresnet18 --epochs 20 --seeds 0,1,2      # GPU
    python bench/real_faces.py --smoke                                            # CPU, 1 min
    python bench/real_faces.py --merge a.json b.json --out bench/results/real_faces.json
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    RESULTS_DIR,
    SHARED_DATA,
    BenchError,
    fmt,
    git_commit,
    markdown_table,
    merge,
    method_sections,
    parse_list,
    print_table,
    provenance,
    run_main,
    write_json,
)

METHODS = ("arcface", "cosface", "curricular", "mv-softmax", "magface", "adaface", "qcface",
           "qcface-cur", "eqface", "qgface")
# The 2-core CPU protocol (docs/BENCHMARKS.md): a narrow IResNet-18 at 112 px converges in
# about 10 epochs within ~45 minutes per method on 2 cores (measured 79 img/s training steps).
CPU_PRESET = {"backbone": "iresnet18", "backbone_params": {"base_width": 16},
              "epochs": 10.0, "batch_size": 128, "device": "cpu", "workers": 0,
              "val_every_epoch": True, "results_dir": "bench/results/real_faces_cpu",
              "runs_dir": "runs/bench_real_faces_cpu"}
BASE_CONFIG = REPO / "configs" / "bench" / "real_faces.yaml"
TEST_FOLDS = (8, 9, 10)
DEGRADE_SEED = 2024  # which kind each test image gets, and the kinds' own randomness
MIX_SEED = 7  # which severity each image has in the mixed set
FAR = 1e-2
EDC_FMR = 1e-2
DISCARD_LIMITS = (0.2, 0.3)
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def run_label(run: dict) -> str:
    """A table row's name: the method, plus ``@variant`` for a run with ``--set`` overrides."""
    return run["method"] + (f"@{run['variant']}" if run.get("variant") else "")


def row_name(method: str, variant: str, seed: int) -> str:
    """One run's name: its result file ``<name>.json``, its run folder and its log."""
    return f"{run_label({'method': method, 'variant': variant})}-seed{seed}"


def first_seed_run(runs: list[dict], label: str, result: str | None = None) -> dict | None:
    """The finished run of row ``label`` with the lowest seed (among those whose results hold
    ``result``, when given): the one a plot or the shipped model stands for."""
    finished = [r for r in runs if run_label(r) == label and "error" not in r
                and (result is None or result in r["results"])]
    return min(finished, key=lambda r: r["seed"], default=None)


def label_order(labels) -> list[str]:
    """Rows in METHODS order (each method's variants right after it), then unknown names."""
    def key(label: str):
        method, _, variant = label.partition("@")
        rank = METHODS.index(method) if method in METHODS else len(METHODS)
        return (rank, method, variant)

    return sorted(set(labels), key=key)


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
    jobs: int = 1
    embed_batch: int = 256
    overrides: list[str] = field(default_factory=list)
    variant: str = ""
    runs_dir: str = "runs/bench_real_faces"
    results_dir: str = ""
    out: str = ""
    smoke: bool = False
    preset: str = ""
    val_every_epoch: bool = False
    checkpoint_every: int = 50
    force: bool = False
    reevaluate: bool = False
    merge: list[str] = field(default_factory=list)
    table: str = ""
    ship_best: bool = False


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
    """The TrainingConfig of one (method, seed): the method's whole shipped config, with the
    sections the protocol fixes (backbone, data, validation, optimiser, schedule, seed, length,
    output) taken from the base file and the flags."""
    import yaml

    from qualiface.config import apply_overrides, from_dict

    base = yaml.safe_load(BASE_CONFIG.read_text())
    method_file = REPO / "configs" / f"{method}_r50.yaml"
    shipped = yaml.safe_load(method_file.read_text()) if method_file.is_file() else {
        "head": {"name": method}}
    shipped_epochs = (shipped.get("train") or {}).get("epochs")
    # The protocol's length is the whole run, every phase included (EQFace's steps 2-3 too), so
    # each method gets the same number of optimizer steps; each phase keeps its shipped share.
    total_epochs = shipped_run_epochs(shipped, method_file)
    share_of_training = float(shipped_epochs) / total_epochs if shipped_epochs else 1.0
    merged = dict(shipped)
    if "pipeline" in merged and total_epochs:
        merged["pipeline"] = rescale_phases(merged["pipeline"], total_epochs, cfg)
    # model: the protocol's backbone; the method keeps its own model parameters
    # (learnable_embedding_scale, ...) unless the protocol sets the same key.
    model = merge(merged.get("model") or {}, {"params": base["model"].get("params", {})})
    model["backbone"] = cfg.backbone
    model["params"] = merge(model.get("params", {}), cfg.backbone_params)
    merged["model"] = model
    for section in ("data", "optim", "schedule"):
        merged[section] = base[section]
    merged["val"] = base["val"]
    merged["data"]["params"] = {"list_file": str(list_file), "root": str(data_root)}
    merged["data"]["num_workers"] = cfg.workers
    train = merge(merged.get("train") or {}, base["train"])
    train.update(batch_size=cfg.batch_size, device=cfg.device, seed=seed,
                 output_dir=str(out_dir), progress=True, resume=True,
                 checkpoint_every=cfg.checkpoint_every)
    train.pop("steps", None)
    if cfg.max_steps > 0:
        train["steps"] = max(1, round(cfg.max_steps * share_of_training))
        merged["schedule"]["warmup_steps"] = max(1, cfg.max_steps // 20)
    else:
        train["epochs"] = cfg.epochs * share_of_training
    merged["train"] = train
    if cfg.val_every_epoch:
        images = sum(1 for line in list_file.read_text().splitlines()
                     if line.strip() and not line.startswith("#"))
        train["eval_every"] = max(1, images // cfg.batch_size)  # one epoch (drop-last batches)
        # LFW folds 8-10 after every epoch: the curve that shows whether a run has converged
        # (accuracy no longer rising). It only monitors; nothing is selected on it.
        merged["val"] = {"kind": "pairs", "root": str(data_root / "lfw" / "aligned112"),
                         "pairs": str(data_root / "lfw" / "pairs.txt"),
                         "folds": list(TEST_FOLDS)}
    merged = apply_overrides(merged, cfg.overrides)
    return from_dict(merged, source=f"{BASE_CONFIG} + {method_file.name} (seed {seed})")


def shipped_run_epochs(shipped: dict, source: Path) -> float | None:
    """The shipped config's whole run in epochs: the sum over the method's phases (``train.epochs``
    alone for one-phase methods; EQFace adds its steps 2 and 3)."""
    from qualiface.config import from_dict
    from qualiface.methods import build_method

    if not (shipped.get("train") or {}).get("epochs"):
        return None
    phases = build_method(from_dict(shipped, source=str(source))).phases()
    if any(phase.steps > 0 for phase in phases):
        raise BenchError(f"{source}: a phase is given in steps; the protocol scales epochs only")
    return float(sum(phase.epochs for phase in phases))


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


def evaluate_package(package: Path, bench, clean, degraded: dict, kinds: list[str], device: str,
                     cfg: RealFacesConfig, label: str) -> dict:
    """Embed the clean and degraded test images with a model package and score everything."""
    import numpy as np

    from qualiface.eval.benchmarks import evaluate_pairs
    from qualiface.eval.features import FeatureSet, extract_features
    from qualiface.infer.model import package_embed_fn
    from qualiface.eval.degraded import scores_by_severity, severity_correlations

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
    scores = scores_by_severity({s: features[s] for s in order}, bench.ids)
    results["spearman_vs_severity"] = severity_correlations(scores)
    # The same per degradation kind: a pooled rho near 0 can hide a score that falls for blur
    # and rises for another kind (each image keeps its kind at every level).
    kind_of = np.asarray(kinds)
    results["spearman_by_kind"] = {
        kind: severity_correlations({name: {s: v[kind_of == kind] for s, v in per_level.items()}
                                     for name, per_level in scores.items()})
        for kind in sorted(set(kinds))}
    # Median and quartiles per severity: what the quality-vs-severity plot draws.
    results["quality_by_severity"] = {
        name: {f"{s:g}": np.percentile(values, [25, 50, 75]) for s, values in per_level.items()}
        for name, per_level in scores.items()}
    return {"results": results, "edcs": edcs}


# --------------------------------------------------------------------------- one run


def train_and_evaluate(cfg: RealFacesConfig, method: str, seed: int, list_file: Path,
                       data_root: Path, bench, clean, degraded, kinds: list[str],
                       eval_device: str) -> dict:
    """Train (or resume) one (method, seed) and evaluate its model package.

    The seconds spent training are added up over every invocation in ``bench_time.json`` of
    the run folder, so a run resumed across sessions still reports its whole training time;
    ``train.commits`` lists the commit of every start and resume (``record_start``).
    """
    import json

    import yaml

    from qualiface.config import to_dict
    from qualiface.train.loop import TrainingError, train

    label = run_label({"method": method, "variant": cfg.variant})
    out_dir = Path(cfg.runs_dir) / row_name(method, cfg.variant, seed)
    tcfg = run_config(cfg, method, seed, list_file, data_root, out_dir)
    effective = to_dict(tcfg)
    print(f"-- effective config of {label} (seed {seed}):\n"
          + yaml.safe_dump(effective, sort_keys=False), file=sys.stderr, flush=True)
    commits = record_start(out_dir)
    clock = out_dir / "bench_time.json"
    spent = json.loads(clock.read_text())["train_seconds"] if clock.is_file() else 0.0
    started = time.perf_counter()
    try:
        result = train(tcfg)
    except TrainingError as exc:
        return {"method": method, "seed": seed, **variant_fields(cfg), "error": str(exc),
                "config": effective}
    finally:
        spent += time.perf_counter() - started
        if out_dir.is_dir():
            write_json(clock, {"train_seconds": spent})
    if result.model_package is None:
        raise BenchError(f"{out_dir}: the trainer wrote no model package")
    evaluation = evaluate_package(result.model_package, bench, clean, degraded, kinds,
                                  eval_device, cfg, f"{label} s{seed}")
    last = {k: v for k, v in result.last_metrics.items() if isinstance(v, (int, float))}
    images = result.global_step * cfg.batch_size
    return {"method": method, "seed": seed, **variant_fields(cfg), "run_dir": str(out_dir),
            "config": effective,
            "train": {"steps": result.global_step, "seconds": spent,
                      "images_per_s": images / spent if spent > 0 else None,
                      "last_metrics": last, "validation_curve": validation_curve(out_dir),
                      "commits": commits},
            **evaluation}


START_LOG = "bench_commits.txt"


def record_start(out_dir: Path) -> list[str]:
    """Append the commit this invocation trains on to ``bench_commits.txt`` of the run folder
    and return every start's commit so far, oldest first ("unknown" outside a git checkout).
    A row resumed across commits trained partly on each, which its ``git_commit`` (the HEAD
    when the row is written) does not show. Written before training, so a killed session's
    commit is kept too."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / START_LOG
    if not log.is_file() and any(out_dir.glob("checkpoint*.pt")):
        log.write_text("unrecorded\n")  # trained before this log existed, on unknown commits
    with log.open("a") as handle:
        handle.write(f"{git_commit() or 'unknown'}\n")
    return log.read_text().split()


# Config keys a stored row may hold differently from today's without being stale: where the
# data was (paths differ between machines), on top of what a resume may change.
STALE_MAY_DIFFER = ("data.params.",)


def stale_config_keys(run: dict, settings: dict) -> list[str] | None:
    """The config keys in which a finished row's training config differs from the one its
    command would train with today (a shipped config or default changed since): such a row no
    longer shows what its command reproduces. None when today's config cannot be built here
    (the training list is not on this machine)."""
    from qualiface.config import to_dict
    from qualiface.errors import QualifaceError
    from qualiface.train.checkpoint import config_differences

    known = {f.name for f in fields(RealFacesConfig)}
    cfg = RealFacesConfig(**{k: v for k, v in settings.items() if k in known})
    cfg.overrides, cfg.variant = list(run.get("overrides") or []), run.get("variant") or ""
    stored = run.get("config") or {}
    list_file = Path(((stored.get("data") or {}).get("params") or {}).get("list_file", ""))
    try:
        today = to_dict(run_config(cfg, run["method"], run["seed"], list_file,
                                   Path(settings.get("data") or SHARED_DATA),
                                   Path(run.get("run_dir") or cfg.runs_dir)))
    except (OSError, BenchError, QualifaceError, ValueError):
        return None
    return [key for key, _, _ in config_differences(stored, today)
            if not key.startswith(STALE_MAY_DIFFER)]


def variant_fields(cfg: RealFacesConfig) -> dict:
    """What a variant run stores beside its method: the name and the overrides that define it."""
    return {"variant": cfg.variant, "overrides": list(cfg.overrides)} if cfg.variant else {}


def validation_curve(out_dir: Path) -> list[dict]:
    """(step, LFW 8-10 accuracy) records the trainer logged, for the convergence check."""
    import json

    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "accuracy": r.get("val_accuracy"), "auc": r.get("val_auc")}
            for r in rows if r.get("kind") == "val"]


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
             ("rho norm", "spearman:feature norm", False),
             ("tau q", "kendall:model quality", False),
             ("tau norm", "kendall:feature norm", False),
             ("train min", "train:minutes", False),
             ("img/s", "train:images_per_s", False)]
    return cols


def column_value(run: dict, path: str):
    part, key = path.split(":", 1)
    results = run["results"]
    if part in ("spearman", "kendall"):
        return results["spearman_vs_severity"][key].get(part)
    if part == "train":
        train = run.get("train", {})
        if key == "minutes":
            return train["seconds"] / 60 if train.get("seconds") else None
        return train.get(key)
    return results[part]["summary"].get(key)


def aggregate(runs: list[dict], methods: list[str], severities: list[float]) -> dict:
    """Per method and column: mean and std over seeds (sample std; 0 for one seed)."""
    out = {}
    for method in methods:
        ok = [r for r in runs if run_label(r) == method and "error" not in r]
        seeds = [r["seed"] for r in ok]
        if len(set(seeds)) != len(seeds):
            # the same run twice (a copied result file, a file merged twice) would count as
            # extra seeds: a wrong mean and a too-small std
            raise BenchError(f"{method}: seed(s) "
                             f"{sorted({s for s in seeds if seeds.count(s) > 1})} appear more "
                             f"than once among the runs")
        entry = {"seeds": [r["seed"] for r in ok],
                 "errors": [r["error"] for r in runs if run_label(r) == method and "error" in r]}
        overrides = next((r.get("overrides") for r in ok if r.get("overrides")), None)
        if overrides:
            entry["overrides"] = overrides
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
            if value["n"] < len(entry["seeds"]):  # a seed lacks this column: not its mean
                text += f" ({value['n']} of {len(entry['seeds'])} seeds)"
            row.append(text)
        rows.append(row)
    return header, rows


def kind_table(runs: list[dict], labels: list[str]) -> tuple[list, list]:
    """Rows ``label, rho q / rho norm per kind`` from the runs that carry ``spearman_by_kind``
    (runs evaluated before it existed are left out: ``--reevaluate`` adds it)."""
    with_kinds = [r for r in runs if "error" not in r and "spearman_by_kind" in r["results"]]
    kinds = sorted({k for r in with_kinds for k in r["results"]["spearman_by_kind"]})
    header = ["method"] + [f"{k} q / norm" for k in kinds]
    rows = []
    for label in labels:
        mine = [r["results"]["spearman_by_kind"] for r in with_kinds if run_label(r) == label]
        if not mine:
            continue
        row = [label]
        for kind in kinds:
            cells = []
            for score in ("model quality", "feature norm"):
                values = [m[kind][score]["spearman"] for m in mine if kind in m
                          and m[kind][score].get("spearman") is not None]
                cells.append(f"{statistics.fmean(values):+.2f}" if values else "-")
            row.append(" / ".join(cells))
        rows.append(row)
    return header, rows


LATE_CHECKS = 3  # a run has converged when its last this-many checks gain (almost) nothing


def accuracy_curve(run: dict) -> list[tuple[int, float]]:
    """(step, LFW 8-10 accuracy) after each check of one run, one per step (a resumed run may
    have logged a step twice: the later record counts), in step order."""
    by_step = {r["step"]: r["accuracy"] for r in run["train"].get("validation_curve") or []
               if r.get("accuracy") is not None}
    return sorted(by_step.items())


def late_gain(accuracies: list[float], late: int = LATE_CHECKS) -> float | None:
    """Best accuracy of the last ``late`` checks minus the best before them: near zero or below
    when the curve is flat (converged), clearly positive while it still rises; None when the
    curve is too short to tell."""
    if len(accuracies) <= late:
        return None
    return max(accuracies[-late:]) - max(accuracies[:-late])


def convergence_table(runs: list[dict], labels: list[str]) -> tuple[list, list]:
    """Rows ``label, accuracy after each check, best, last, late gain`` (first seed of each row;
    rows without checks are left out)."""
    header = ["method", "LFW 8-10 acc % after each epoch", "best", "last",
              f"gain in last {LATE_CHECKS} (pt)"]
    rows = []
    for label in labels:
        run = first_seed_run(runs, label)
        accuracies = [a for _, a in accuracy_curve(run)] if run else []
        if not accuracies:
            continue
        gain = late_gain(accuracies)
        rows.append([label, " ".join(f"{100 * a:.1f}" for a in accuracies),
                     f"{100 * max(accuracies):.1f}", f"{100 * accuracies[-1]:.1f}",
                     "-" if gain is None else f"{100 * gain:+.1f}"])
    return header, rows


def backbone_params(settings: dict) -> str:
    """`` (base_width=16)`` for the table's heading; empty without extra backbone arguments."""
    params = settings.get("backbone_params") or {}
    return f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""


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
        f"{s['backbone']}{backbone_params(s)}, {schedule}, batch {s['batch_size']}, "
        f"seeds {s['seeds']}; "
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
    kind_header, kind_rows = kind_table(payload["runs"], list(payload["summary"]))
    if kind_rows:
        lines += ["\nSpearman of each method's quality score (q) and feature norm with severity, "
                  "per degradation kind (each test image keeps one kind at every level; mean over "
                  "seeds; more negative is better):\n", markdown_table(kind_header, kind_rows)]
    conv_header, conv_rows = convergence_table(payload["runs"], list(payload["summary"]))
    if conv_rows:
        lines += [f"\nConvergence (first seed): LFW 8-10 accuracy after each epoch of training "
                  f"(monitoring only, nothing is selected on it); the last column is the best of "
                  f"the last {LATE_CHECKS} checks minus the best before them, near 0 or below "
                  f"once the curve is flat:\n", markdown_table(conv_header, conv_rows)]
    if payload.get("stale_rows"):
        lines.append("\n**Stale rows** (trained with a config that has changed since; re-train "
                     "with `--force`): " + "; ".join(
                         f"`{name}`: {', '.join(f'`{k}`' for k in keys)}"
                         for name, keys in payload["stale_rows"].items()) + ".\n")
    variants = {label: entry["overrides"] for label, entry in payload["summary"].items()
                if entry.get("overrides")}
    if variants:
        lines.append("\nVariants (the method's config with these overrides): " + "; ".join(
            f"`{label}`: {', '.join(f'`{o}`' for o in overrides)}"
            for label, overrides in variants.items()) + ".\n")
    path.write_text("\n".join(lines))
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a server), imported on
    first use so that training rows do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def give_each_series_a_colour(fig, count: int) -> None:
    """Colour cycle with ``count`` distinct colours on every axes of ``fig``: matplotlib's
    default cycle has ten, so with eleven rows the eleventh (QGFace) took the first's colour
    (ArcFace) and the two could not be told apart."""
    cmap = pyplot().get_cmap("tab10" if count <= 10 else "tab20")
    colours = [cmap(i % cmap.N) for i in range(max(1, count))]
    for ax in fig.axes:
        ax.set_prop_cycle(color=colours)


def plot_edcs(path: Path, runs: list[dict], methods: list[str]) -> Path | None:
    """One EDC per method (first seed) for its quality score and, dashed, its feature norm."""
    plt = pyplot()

    from qualiface.eval.report import draw_edcs

    panels = {"model quality": {}, "feature norm": {}}  # score -> method -> curve
    for method in methods:
        run = first_seed_run(runs, method)
        if run is None:
            continue
        for prefix, curves in panels.items():
            for name, curve in run.get("edcs", {}).items():
                if name.startswith(prefix):
                    curves[method] = curve
    if not any(panels.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    give_each_series_a_colour(fig, max(len(curves) for curves in panels.values()))
    titles = ("method's quality score", "feature norm")
    for ax, curves, title in zip(axes, panels.values(), titles):
        draw_edcs(ax, curves, f"EDC, mixed-severity LFW 8-10: {title}",
                  ylabel=f"FNMR at FMR {EDC_FMR:g}")
        ax.legend(fontsize="small", loc="upper right", ncol=2)  # the curves lie below ~0.7
    return save_figure(fig, path)


def plot_quality_vs_severity(path: Path, runs: list[dict], methods: list[str]) -> Path | None:
    """Median (line) and quartiles (band) of each method's quality score per severity, first
    seed; one panel for the method's own score, one for the feature norm, each relative to the
    method's clean images (clean median 0, clean IQR 1) so that scores of different scales (a
    norm of ~20, a probability of ~0.9) share an axis."""
    plt = pyplot()
    import numpy as np

    chosen = [first_seed_run(runs, m, "quality_by_severity") for m in methods]
    chosen = [r for r in chosen if r is not None]
    if not chosen:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    give_each_series_a_colour(fig, len(chosen))
    for ax, name in zip(axes, ("model quality", "feature norm")):
        for run in chosen:
            per = run["results"]["quality_by_severity"][name]
            levels = sorted(per, key=float)
            x = [float(k) for k in levels]
            q = np.array([per[k] for k in levels], dtype=float)  # (levels, [q25, q50, q75])
            centre, spread = q[0, 1], max(q[0, 2] - q[0, 0], 1e-12)
            q = (q - centre) / spread
            line, = ax.plot(x, q[:, 1], marker="o", label=run_label(run))
            ax.fill_between(x, q[:, 0], q[:, 2], color=line.get_color(), alpha=0.12)
        ax.set_xlabel("degradation severity (0 = clean)")
        ax.set_ylabel(f"{name}, relative to clean (median 0, IQR 1)")
        ax.set_title(f"{name} vs severity, LFW 8-10 (falling = tracks damage)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    return save_figure(fig, path)


def plot_quality_by_kind(path: Path, runs: list[dict], methods: list[str]) -> Path | None:
    """Grouped bars: Spearman of each method's quality score with severity, per degradation
    kind (first seed); below zero = the score falls as that damage grows."""
    plt = pyplot()
    import numpy as np

    chosen = [first_seed_run(runs, m, "spearman_by_kind") for m in methods]
    chosen = [r for r in chosen if r is not None]
    if not chosen:
        return None
    kinds = sorted({k for r in chosen for k in r["results"]["spearman_by_kind"]})
    width = 0.8 / len(chosen)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(kinds) + 0.3 * len(chosen)), 4.5))
    give_each_series_a_colour(fig, len(chosen))
    for i, run in enumerate(chosen):
        per_kind = run["results"]["spearman_by_kind"]
        values = [per_kind.get(k, {}).get("model quality", {}).get("spearman") for k in kinds]
        values = [np.nan if v is None else v for v in values]
        ax.bar(np.arange(len(kinds)) + (i - (len(chosen) - 1) / 2) * width, values, width,
               label=run_label(run))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(kinds)), [k.replace("_", " ") for k in kinds])
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Spearman(quality, severity)")
    ax.set_title("Does each method's quality fall with each kind of damage? (below 0 = yes)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(5, len(chosen)))
    return save_figure(fig, path)


def plot_convergence(path: Path, runs: list[dict], methods: list[str]) -> Path | None:
    """LFW 8-10 accuracy against training progress, one line per method (first seed): the
    curves the convergence claim rests on."""
    plt = pyplot()

    curves = {}
    for method in methods:
        run = first_seed_run(runs, method)
        curve = accuracy_curve(run) if run else []
        if curve:
            total = run["train"].get("steps") or curve[-1][0]
            curves[method] = ([step / total for step, _ in curve], [100 * a for _, a in curve])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    give_each_series_a_colour(fig, len(curves))
    for method, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=method)
    ax.set_xlabel("fraction of training done")
    ax.set_ylabel("LFW folds 8-10 accuracy %")
    ax.set_title("Convergence: accuracy after each epoch (flat at the end = converged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return save_figure(fig, path)


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
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many rows at once, each in its own process with "
                             "cores/jobs threads (measured gain on 2 cores: docs/BENCHMARKS.md)")
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="config override for every run, e.g. head.params.easy_margin=true "
                             "(needs --variant)")
    parser.add_argument("--variant", default="", metavar="NAME",
                        help="name the runs made with --set: rows 'method@NAME', files "
                             "'method@NAME-seed<k>.json', kept apart from the protocol's rows")
    parser.add_argument("--runs-dir", default=None, help="where the runs are written")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/...)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="only combine earlier result files into one table (no training)")
    parser.add_argument("--table", default="", metavar="DIR",
                        help="only merge the run files of DIR (one JSON per method and seed) "
                             "into DIR/table.{md,json} with the EDC and quality plots")
    parser.add_argument("--ship-best", action="store_true",
                        help="with --table: copy the model package of the most accurate row "
                             "(by its mean over seeds; the lowest seed whose run folder survives) "
                             "to DIR/best_model with a model card, if <= 20 MB")
    parser.add_argument("--preset", choices=("cpu",), default="",
                        help="cpu: the 2-core CPU protocol (iresnet18 width 16, 112 px, "
                             "10 epochs, LFW 8-10 checked every epoch); flags given win")
    parser.add_argument("--results-dir", default=None,
                        help="one result JSON per (method, seed) goes here; existing ones are "
                             "reused, not re-run")
    parser.add_argument("--force", action="store_true",
                        help="re-run (method, seed) pairs whose result file already exists")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished runs' model packages again (new result columns "
                             "for old runs, no training); needs their run folders")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="steps between checkpoints (a killed run resumes from the last)")
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
        workers=args.workers, threads=args.threads, jobs=args.jobs,
        embed_batch=args.embed_batch,
        overrides=args.overrides, variant=args.variant, smoke=args.smoke, merge=args.merge,
        table=args.table, ship_best=args.ship_best,
        preset=args.preset, force=args.force, reevaluate=args.reevaluate,
        checkpoint_every=args.checkpoint_every,
    )
    explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.preset == "cpu":
        flags = {"backbone": "--backbone", "backbone_params": "--backbone-param",
                 "epochs": "--epochs", "batch_size": "--batch-size", "device": "--device",
                 "workers": "--workers", "results_dir": "--results-dir",
                 "runs_dir": "--runs-dir"}
        for name, value in CPU_PRESET.items():
            if flags.get(name) not in explicit:
                setattr(cfg, name, value)
    if args.smoke:
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
    if cfg.overrides and not cfg.variant:
        raise BenchError("--set changes what a run measures: name it with --variant NAME so its "
                         "rows and files stay apart from the protocol's")
    if cfg.variant and not VARIANT_NAME.fullmatch(cfg.variant):
        raise BenchError(f"--variant {cfg.variant!r}: use lower-case letters, digits, '-' or '_'")
    if cfg.variant and not cfg.overrides:
        raise BenchError(f"--variant {cfg.variant}: give the overrides that define it with --set")
    if any(not 0 < s <= 1 for s in cfg.severities):
        raise BenchError(f"--severities must be in (0, 1], got {cfg.severities}")
    if cfg.jobs < 1:
        raise BenchError(f"--jobs must be >= 1, got {cfg.jobs}")
    if cfg.batch_size < 1 or cfg.epochs <= 0 or cfg.max_steps < 0:
        raise BenchError("--batch-size and --epochs must be positive, --max-steps >= 0")
    suffix = "_smoke" if cfg.smoke else ""
    if args.results_dir:
        cfg.results_dir = args.results_dir
    elif args.out:  # the run files go beside an explicit --out
        cfg.results_dir = str(Path(args.out).with_suffix("")) + "_runs"
    elif not cfg.results_dir:
        cfg.results_dir = str(RESULTS_DIR / f"real_faces{suffix}_runs")
    cfg.out = args.out or str(Path(cfg.results_dir) / "table.json")
    if args.runs_dir or not cfg.preset:
        cfg.runs_dir = args.runs_dir or f"runs/bench_real_faces{suffix}"
    return cfg


def main(argv=None) -> dict:
    import torch

    from qualiface.devices import DeviceError, parse_device

    cfg = parse_args(argv)
    if cfg.ship_best and not cfg.table:
        raise BenchError("--ship-best goes with --table DIR (it ships from that table)")
    if cfg.table:
        payload = table_from_dir(Path(cfg.table))
        if cfg.ship_best:
            payload["shipped"] = str(ship_best(payload, Path(cfg.table)))
        return payload
    if cfg.merge:
        return merge_results(cfg)
    if cfg.jobs > 1:
        train_in_parallel(cfg, list(argv) if argv is not None else sys.argv[1:])
        cfg.force = False  # the rows are trained now: the pass below only collects them
    if cfg.threads:
        # One thread on a shared CPU: OpenMP workers spinning for busy cores cost 10-100x.
        torch.set_num_threads(cfg.threads)
    try:
        parse_device(cfg.device)
    except DeviceError as exc:
        raise BenchError(f"--device: {exc}") from None
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

    # The protocol's degraded test set was built with each level's draws seeded by its
    # severity (``shared_draws=False``) before the library default changed; every row keeps
    # that set, since re-evaluating the table on shared draws needs every row's run folder.
    degraded, kinds = degraded_copies(clean, cfg.severities, seed=DEGRADE_SEED, shared_draws=False,
                                      progress=True)
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
    results_dir = Path(cfg.results_dir)
    for seed in cfg.seeds:
        for method in cfg.methods:
            label = run_label({"method": method, "variant": cfg.variant})
            run_file = results_dir / f"{row_name(method, cfg.variant, seed)}.json"
            if run_file.is_file() and not cfg.force:
                earlier = read_run(run_file)
                check_same_protocol(run_file, earlier["settings"], asdict(cfg))
                if cfg.reevaluate:
                    run = reevaluate(earlier, run_file, bench, clean, degraded, kinds,
                                     eval_device, cfg, f"{label} s{seed}")
                    write_json(run_file, {**earlier, "run": run})
                else:
                    print(f"== {label} (seed {seed}): done earlier, reusing {run_file}",
                          file=sys.stderr, flush=True)
                    run = earlier["run"]
                payload["runs"].append(run)
                continue
            if cfg.reevaluate:
                raise BenchError(f"{run_file}: no earlier result to re-evaluate (train it first, "
                                 f"without --reevaluate)")
            print(f"== {label} (seed {seed})", file=sys.stderr, flush=True)
            run = train_and_evaluate(cfg, method, seed, list_file, data_root, bench, clean,
                                     degraded, kinds, eval_device)
            payload["runs"].append(run)
            # One file per run (with the header): runs done in other sessions merge in.
            write_json(run_file, {**{k: v for k, v in payload.items() if k != "runs"},
                                  "provenance": provenance(eval_device), "run": run})
    if out_path == results_dir / "table.json":
        # The folder's table holds every row trained there, in any session: rebuild it whole
        # rather than overwrite it with this command's rows only.
        return table_from_dir(results_dir)
    return finish(payload, out_path, cfg.methods, cfg.severities)


# --------------------------------------------------------------------------- parallel rows

PROGRESS_EVERY_S = 60.0


def pending_rows(cfg: RealFacesConfig) -> list[tuple[str, int]]:
    """The (method, seed) rows this command would train: no result file yet, or ``--force``."""
    results_dir = Path(cfg.results_dir)
    return [(m, s) for s in cfg.seeds for m in cfg.methods
            if cfg.force or not (results_dir / f"{row_name(m, cfg.variant, s)}.json").is_file()]


def without_options(argv: list[str], valued: set[str], flags: set[str]) -> list[str]:
    """``argv`` less the options in ``valued`` (with their value, as ``--x v`` or ``--x=v``) and
    the bare ``flags``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags or (name in valued and "=" in arg):
            continue
        if arg in valued:
            skip = True
            continue
        out.append(arg)
    return out


def child_command(argv: list[str], cfg: RealFacesConfig, method: str, seed: int,
                  threads: int) -> list[str]:
    """The command that trains one row on its own: this script with the caller's options, one
    method and seed, its thread share, and the caller's result and run folders made explicit.
    Its ``--out`` is its own run folder's, so that rows finishing together never write the
    folder's table at the same time (the caller rebuilds it once all are done)."""
    base = without_options(argv, {"--methods", "--seeds", "--jobs", "--threads", "--out",
                                  "--results-dir", "--runs-dir"}, {"--force"})
    return [sys.executable, str(Path(__file__).resolve()), *base, "--methods", method,
            "--seeds", str(seed), "--threads", str(threads), "--results-dir", cfg.results_dir,
            "--runs-dir", cfg.runs_dir,
            "--out", str(Path(cfg.runs_dir) / f"{row_name(method, cfg.variant, seed)}-table.json"),
            *(["--force"] if cfg.force else [])]


def last_progress_line(log: Path) -> str:
    """The latest status a child printed (its progress bar redraws with carriage returns)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return lines[-1] if lines else ""


def train_in_parallel(cfg: RealFacesConfig, argv: list[str]) -> None:
    """Train the pending rows ``cfg.jobs`` at a time, each as a child process with
    ``cores / min(jobs, rows)`` torch threads (``--threads`` wins) and its output in
    ``<runs_dir>/<label>-seed<k>.log``; print each child's progress every minute. Rows that
    finish keep their result files whatever the others do; a failed row is named with its log."""
    import os
    import subprocess

    rows = pending_rows(cfg)
    if not rows or cfg.reevaluate:
        return
    # Fewer rows than jobs: the cores go to the rows there are.
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // min(cfg.jobs, len(rows)))
    runs_dir = Path(cfg.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"== {len(rows)} row(s), {min(cfg.jobs, len(rows))} at a time with {threads} "
          f"thread(s) each; logs in {runs_dir}/<row>-seed<k>.log", file=sys.stderr, flush=True)
    waiting, running, failed = list(rows), {}, []
    last_report = time.monotonic()
    while waiting or running:
        while waiting and len(running) < cfg.jobs:
            method, seed = waiting.pop(0)
            name = row_name(method, cfg.variant, seed)
            log = runs_dir / f"{name}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(child_command(argv, cfg, method, seed, threads),
                                        stdout=out, stderr=subprocess.STDOUT)
            running[name] = (proc, log, time.monotonic())
            print(f"== {name}: started (log {log})", file=sys.stderr, flush=True)
        time.sleep(0.5)
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            minutes = (time.monotonic() - started) / 60
            if proc.returncode == 0:
                print(f"== {name}: done in {minutes:.0f} min", file=sys.stderr, flush=True)
            else:
                failed.append(f"{name} (exit {proc.returncode}; {log}: "
                              f"{last_progress_line(log) or 'no output'})")
                print(f"== {name}: FAILED after {minutes:.0f} min, see {log}", file=sys.stderr,
                      flush=True)
        if running and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            for name, (_, log, _) in running.items():
                print(f"   {name}: {last_progress_line(log)}", file=sys.stderr, flush=True)
    if failed:
        raise BenchError(f"{len(failed)} of {len(rows)} row(s) failed (the others kept their "
                         f"result files): " + "; ".join(failed))


def reevaluate(earlier: dict, run_file: Path, bench, clean, degraded, kinds: list[str],
               eval_device: str, cfg: RealFacesConfig, label: str) -> dict:
    """Evaluate a finished run's model package again with this version of the evaluation (new
    columns for old runs, no retraining); training figures and config are kept, and any result
    that was already there and changed is named (the evaluation is deterministic)."""
    run = earlier["run"]
    package = Path(run.get("run_dir", "")) / "model"
    if not (package / "model.json").is_file():
        raise BenchError(f"{run_file}: its model package {package} is gone; re-evaluation needs "
                         f"the run folder (or re-train with --force)")
    print(f"== {label}: re-evaluating {package}", file=sys.stderr, flush=True)
    fresh = evaluate_package(package, bench, clean, degraded, kinds, eval_device, cfg, label)
    gaps = {key: largest_gap(json_roundtrip(run["results"][key]),
                             json_roundtrip(fresh["results"][key]))
            for key in run.get("results", {}) if key in fresh["results"]}
    # Another thread count sums float32 features in another order: ~1e-6 moves are expected.
    changed = [key for key, gap in gaps.items() if gap > REEVALUATE_TOLERANCE]
    print(f"   largest change against the stored results: {max(gaps.values(), default=0):.2g}"
          + (f"; CHANGED beyond {REEVALUATE_TOLERANCE:g}: {', '.join(changed)}" if changed
             else ""), file=sys.stderr, flush=True)
    return {**run, **fresh, "reevaluated": {**provenance(eval_device), "changed": changed,
                                            "largest_change": gaps}}


REEVALUATE_TOLERANCE = 1e-4


def largest_gap(a, b) -> float:
    """The largest absolute difference between the numbers of two like-shaped JSON values
    (``inf`` when their shapes, keys or non-numbers differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return math.inf
        return max((largest_gap(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((largest_gap(x, y) for x, y in zip(a, b)), default=0.0)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else math.inf


def json_roundtrip(value):
    """``value`` as it reads back from a result file (arrays as lists, NaN as null), so fresh
    and stored results compare like for like."""
    import json

    from qualiface.files import json_ready

    return json.loads(json.dumps(json_ready(value), allow_nan=False))


def read_run(path: Path) -> dict:
    """One per-run result file, with a clear error when it is not one."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: cannot read a real_faces run result ({exc})") from None
    if not isinstance(data, dict) or "run" not in data or "settings" not in data:
        raise BenchError(f"{path}: not a real_faces run result (no 'run'/'settings')")
    return data


# Settings that may differ between run files of one table (what each file ran, and where).
PER_RUN_SETTINGS = {"methods", "seeds", "out", "runs_dir", "results_dir", "merge", "table",
                    "force", "threads", "workers", "embed_batch", "checkpoint_every", "device",
                    "variant", "overrides", "data", "reevaluate", "ship_best", "jobs"}


def protocol_settings(settings: dict) -> dict:
    """The settings that define what a run measured (not where or how fast it ran); a setting
    added after a file was written counts as its default there (what that run did)."""
    defaults = asdict(RealFacesConfig())
    merged = {**defaults, **settings}
    return {k: v for k, v in merged.items() if k not in PER_RUN_SETTINGS}


def protocol_differences(first: dict, second: dict) -> list[str]:
    """The protocol settings (``protocol_settings``) in which two settings dicts differ."""
    a, b = protocol_settings(first), protocol_settings(second)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_same_protocol(run_file: Path, earlier: dict, now: dict) -> None:
    """Refuse to reuse a result made under other settings (or other ``--set`` overrides): the
    table would silently show a run that is not what this command asked for."""
    differ = protocol_differences(earlier, now)
    if sorted(earlier.get("overrides") or []) != sorted(now.get("overrides") or []):
        differ.append("overrides (--set)")
    if differ:
        raise BenchError(f"{run_file}: an earlier result made with other settings "
                         f"({', '.join(differ)}); re-run it with --force, or write to another "
                         f"--results-dir")


def table_from_dir(folder: Path) -> dict:
    """Merge every ``<method>-seed<k>.json`` of ``folder`` into ``table.json`` / ``table.md``
    plus the plots ``table_edc.png``, ``table_quality_vs_severity.png``,
    ``table_quality_by_kind.png`` and ``table_convergence.png``; the protocol settings of all
    files must agree (a file from another protocol is named, not silently mixed in)."""
    files = sorted(p for p in folder.glob("*-seed*.json"))
    if not files:
        raise BenchError(f"{folder}: no run results (<method>-seed<k>.json) found")
    datas = [read_run(p) for p in files]
    first = datas[0]
    for path, data in zip(files[1:], datas[1:]):
        differ = protocol_differences(first["settings"], data["settings"])
        if differ:
            raise BenchError(f"{path}: protocol settings differ from {files[0]} in "
                             f"{', '.join(differ)}")
    runs = [d["run"] for d in datas]
    methods = label_order(run_label(r) for r in runs)
    settings = {**first["settings"], "methods": methods,
                "seeds": sorted({r["seed"] for r in runs})}
    payload = {k: v for k, v in first.items() if k not in ("run", "provenance")}
    payload.update(settings=settings, runs=runs, merged_from=[str(p) for p in files],
                   run_provenance={p.name: d.get("provenance") for p, d in zip(files, datas)})
    stale = {}
    for path, data in zip(files, datas):
        keys = stale_config_keys(data["run"], data["settings"])
        if keys:
            stale[path.stem] = keys
            print(f"warning: {path.name}: trained with a config that differs from today's in "
                  f"{', '.join(keys)}; its row no longer shows what its command trains "
                  f"(re-train it with --force)", file=sys.stderr, flush=True)
    payload["stale_rows"] = stale
    return finish(payload, folder / "table.json", methods, settings["severities"])


def finish(payload: dict, out_path: Path, methods: list[str], severities: list[float]) -> dict:
    """Aggregate over seeds, write JSON + Markdown + EDC plot, print the table."""
    payload["summary"] = aggregate(payload["runs"], methods, severities)
    header, rows = table_rows(payload["summary"], methods, severities)
    stem = out_path.with_suffix("")
    payload["markdown"] = str(write_markdown(stem.with_suffix(".md"), payload, header, rows))
    plot = plot_edcs(stem.parent / f"{stem.name}_edc.png", payload["runs"], methods)
    payload["edc_plot"] = str(plot) if plot else None
    plot = plot_quality_vs_severity(stem.parent / f"{stem.name}_quality_vs_severity.png",
                                    payload["runs"], methods)
    payload["quality_plot"] = str(plot) if plot else None
    plot = plot_quality_by_kind(stem.parent / f"{stem.name}_quality_by_kind.png",
                                payload["runs"], methods)
    payload["kind_plot"] = str(plot) if plot else None
    plot = plot_convergence(stem.parent / f"{stem.name}_convergence.png", payload["runs"], methods)
    payload["convergence_plot"] = str(plot) if plot else None
    write_json(out_path, payload)
    s = payload["settings"]
    scale = "" if "gpu" in payload["machine"] else " (CPU scale, not the benchmark)"
    print_table(f"real-face protocol: {s['backbone']}{scale}", header, rows)
    written = [out_path, payload["markdown"]] + [payload[k] for k in (
        "edc_plot", "quality_plot", "kind_plot", "convergence_plot") if payload[k]]
    print(f"wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return payload


SHIP_LIMIT_BYTES = 20 * 1024 * 1024


def ship_best(payload: dict, folder: Path) -> Path:
    """Copy the model package of the protocol row (not a variant) with the best mean clean
    accuracy, its lowest seed whose package is still on disk, to ``folder/best_model`` with a
    model card (``README.md``): what it is, how it was made, its scores, and that it was trained
    on research-only data. Refused when the package is over ``SHIP_LIMIT_BYTES`` or the run
    folders of every seed are gone."""
    import shutil

    from qualiface.files import write_text_atomic
    from qualiface.package.io import MODEL_JSON, WEIGHTS_FILE, package_identity, read_model_spec

    accuracy = {label: entry["severity_0:accuracy"]["mean"]
                for label, entry in payload["summary"].items()
                if "@" not in label and "severity_0:accuracy" in entry}
    if not accuracy:
        raise BenchError(f"{folder}: no finished protocol run to ship")
    label = max(accuracy, key=accuracy.get)
    # The lowest seed whose package is still on disk: run folders do not always survive
    # between sessions, and any seed of the row is a fair model of it (the card names it).
    finished = sorted((r for r in payload["runs"] if run_label(r) == label and "error" not in r),
                      key=lambda r: r["seed"])
    kept = [r for r in finished
            if all((Path(r["run_dir"]) / "model" / f).is_file() for f in (MODEL_JSON, WEIGHTS_FILE))]
    if not kept:
        seeds = ", ".join(str(r["seed"]) for r in finished)
        raise BenchError(f"{finished[0]['run_dir']}: the package of {label} is gone for every "
                         f"seed ({seeds}); re-train one to ship it")
    run = kept[0]
    source = Path(run["run_dir"]) / "model"
    files = [source / MODEL_JSON, source / WEIGHTS_FILE]
    size = sum(f.stat().st_size for f in files)
    if size > SHIP_LIMIT_BYTES:
        raise BenchError(f"{source}: {size / 2**20:.1f} MB, over the {SHIP_LIMIT_BYTES // 2**20} "
                         f"MB limit for a package kept in the repository")
    spec = read_model_spec(source)  # a package that does not load is not shipped
    target = folder / "best_model"
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, target / f.name)
    if package_identity(target) != package_identity(source):
        raise BenchError(f"{target}: the copy differs from {source}")
    settings = payload["settings"]

    def own(key):
        """The shipped run's own score (not its row's mean over seeds)."""
        try:
            value = column_value(run, key)
        except KeyError:
            return None
        return value if value is not None and math.isfinite(value) else None

    def pct(key):
        value = own(key)
        return f"{100 * value:.1f} %" if value is not None else "-"

    def num(key, digits=3):
        value = own(key)
        return f"{value:.{digits}f}" if value is not None else "-"

    # How this run was made: its own result file's header (command, machine), not the table's
    # first file, which may come from another row, machine or thread count.
    made = (payload.get("run_provenance") or {}).get(f"{row_name(run['method'], run.get('variant') or '', run['seed'])}.json") or payload
    card = f"""# Best model of the real-face CPU protocol: {label} (seed {run['seed']})

**Trained on research-only data.** The training images (`train.txt` of the project's shared data:
LFW identities outside folds 8-10, a CelebA subset and a Glint360K sample) are real photographs
under their datasets' non-commercial research terms. Use this model for research and testing
only; it is not a product model (LFW 8-10 accuracy {pct('severity_0:accuracy')}, far below models
trained on millions of images).

- Architecture: {spec.backbone_name} {spec.backbone_kwargs}, {spec.embedding_size}-d
  embedding, 112x112 aligned RGB input (see `model.json` for the exact conventions); head
  `{spec.head_name}`; quality score: {spec.quality.meaning}.
- Files: `model.json` + `{WEIGHTS_FILE}` ({size / 2**20:.1f} MB), package sha256
  `{package_identity(target)}`.
- Made by: `{made['command']}` (training {run['train']['steps']} steps,
  {run['train']['seconds'] / 60:.0f} min on {made['machine'].get('cpu', '?')}), picked by `python bench/real_faces.py --table {folder}
  --ship-best` as the row with the best mean 3-fold accuracy ({100 * accuracy[label]:.1f} %
  over its seeds) among {len(accuracy)} methods.
- Scores of this model (seed {run['seed']}; LFW folds 8-10, 1,800 pairs): accuracy {pct('severity_0:accuracy')}, TAR@FAR1e-2
  {pct('severity_0:tar_at_far_1e-2')}, AUC {num('severity_0:auc')}; quality Spearman with
  degradation severity {num('spearman:model quality', 2)}; EDC pAUC20 {num('mixed:quality_pauc_20')}.
  The full table: `table.md` beside this folder.

Use: `qualiface embed --model {target} IMAGES...`, `qualiface eval --model {target} ...`.
"""
    write_text_atomic(target / "README.md", card)
    print(f"shipped {label} (seed {run['seed']}, {size / 2**20:.1f} MB) to {target}",
          file=sys.stderr)
    return target


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
    first = payloads[0]
    for path, other in zip(cfg.merge[1:], payloads[1:]):
        # The same rule as --table: what was measured must agree; where and how fast (threads,
        # workers, jobs, folders) may differ.
        differ = protocol_differences(first["settings"], other["settings"])
        if differ:
            raise BenchError(f"{path}: settings differ from {cfg.merge[0]} in {', '.join(differ)}")
    runs = [run for p in payloads for run in p["runs"]]
    methods = label_order(run_label(r) for r in runs)
    settings = {**first["settings"], "methods": methods,
                "seeds": sorted({r["seed"] for r in runs}), "merge": list(cfg.merge)}
    payload = {**first, "settings": settings, "runs": runs, "merged_from": list(cfg.merge)}
    return finish(payload, Path(cfg.out), methods, settings["severities"])


if __name__ == "__main__":
    sys.exit(run_main(main))
