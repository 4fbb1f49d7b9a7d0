"""The ``qualiface demo`` job: train QCFace, evaluate it on held-out identities, write a report.

``run_demo(DemoOptions(...))`` runs four phases, each announced on the console:

1. **generating data**: with no ``data`` the training set is the embedded procedural face set
   (``qualiface.data.synthetic``, rendered by the trainer) and the held-out set is its ``test``
   split (disjoint identities, from the config's ``val.params``), rendered into memory with
   each image's recorded degradation severity. With ``data`` (an identity-per-folder image tree
   or an InsightFace ``.rec``) the demo makes a seeded identity split itself: the training
   identities are resized to the model's input size and written to ``<out>/data/train.rec``
   (so the run's ``config.yaml`` stays reproducible with the ordinary ``recordio`` dataset), and
   the held-out identities are resized and degraded with the synthetic set's degradation mix
   (``qualiface.data.degrade``), so quality-versus-severity is measurable on real faces too.
2. **training**: ``qualiface.train.loop.train`` with the demo config (``configs/demo_nano.yaml``:
   QCFace on ``iresnet-nano``) into ``<out>/train`` (metrics.jsonl, model package ``model/``).
3. **evaluating**: the model package embeds the held-out images; balanced genuine/impostor pairs
   (``data.pairs.make_pairs``) go through ``qualiface.eval.benchmarks.evaluate_pairs``: k-fold
   accuracy, ROC, TAR@FAR, EER, EDC and pAUC of the QCFace quality and of the raw feature norm
   (pair quality = min), plus Spearman / Kendall of quality against the recorded severity.
4. **writing report**: ``qualiface.eval.report.write_report`` writes ``metrics.json``,
   ``curves.json``, ``roc.png``, ``edc.png``, ``quality_hist.png``, ``training_loss.png`` (the
   loss curve from ``metrics.jsonl``), ``model_quality_by_severity.png`` (box plot of the
   model quality per severity bin), ``report.md`` and the self-contained ``report.html`` into
   ``<out>``.

Torch's intra-op thread count is chosen from the current load (``choose_threads``): on an
oversubscribed CPU, spin-waiting OpenMP threads made a training step of this tiny network about
five times slower with two threads than with one.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qualiface.config import ConfigError, load_config
from qualiface.data import build_dataset
from qualiface.data.decode import encode_jpeg
from qualiface.data.degrade import CompositeConfig, CompositeDegradation
from qualiface.data.folder import ImageFolderDataset
from qualiface.data.pairs import make_pairs
from qualiface.data.recordio import RecordIODataset, RecordIOWriter
from qualiface.data.synthetic import SyntheticConfig
from qualiface.data.transforms import IMAGE_SIZE
from qualiface.errors import QualifaceError
from qualiface.eval.benchmarks import PairBenchmark, evaluate_pairs
from qualiface.eval.features import extract_features, resize_to
from qualiface.eval.quality import rank_correlations
from qualiface.eval.report import SEVERITY_CAPTION, EvalReport, write_report
from qualiface.files import make_folder
from qualiface.infer.model import package_embed_fn
from qualiface.progress import make_progress
from qualiface.scoring.similarity import l2_normalize
from qualiface.threads import torch_threads
from qualiface.train.logging import console, read_metrics
from qualiface.train.loop import train
from qualiface.train.report import LOSS_CAPTION, loss_curve, loss_plot
from qualiface.train.report import LOSS_PLOT_TITLE  # noqa: F401  (the report's plot title)

#: The demo's default config, shipped inside the package (``configs/`` links to it).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_nano.yaml"
#: Upper edges of the severity bins of the per-severity quality histogram ("clean" is 0).
SEVERITY_BIN_EDGES = (1 / 3, 2 / 3, 1.0)
#: Discard fraction at which the report quotes the FNMR left after discarding.
EDC_QUOTE_FRACTION = 0.2
#: Report plot title of the quality box plot (``write_report`` names the PNGs after titles).
SEVERITY_PLOT_TITLE = "model quality by severity"
#: File marking the sub-folders a demo created (and may delete on the next run).
MARKER = ".qualiface-demo"
QCFACE_NOTE = ("QCFace quality p is a monotone function of the feature norm, so its EDC curves "
               "and rank correlations coincide with the norm's")


class DemoError(QualifaceError, ValueError):
    """A demo that cannot run as asked (bad data folder, too few identities, bad options)."""


@dataclass
class DemoOptions:
    """What ``run_demo`` does.

    out_dir: where the report, ``metrics.json``, plots, ``train/`` and ``data/`` go.
    data: None for the embedded synthetic faces; else an image folder (``root/<id>/<img>``) or
        an InsightFace ``.rec`` (file, prefix or folder) to split by identity.
    config: training config (default ``configs/demo_nano.yaml``); overrides: ``key=value``.
    steps / epochs: training length (> 0 overrides the config; give at most one).
    seed: one seed for the model, the synthetic data, the identity split and the pairs
        (None keeps the config's).
    threads: torch intra-op threads; 0 picks from the CPU load (``choose_threads``).
    num_pairs: evaluation pairs (half genuine); 0 uses the config's ``val.num_pairs``.
    test_fraction, max_train_identities, max_test_identities, max_images_per_identity: the
        identity split of ``data`` (held-out identities need >= 2 images); the caps keep the
        demo minutes long on a large set.
    progress: show progress bars.
    """

    out_dir: Path = Path("runs/demo")
    data: Path | None = None
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    seed: int | None = None
    threads: int = 0
    num_pairs: int = 0
    test_fraction: float = 0.3
    max_train_identities: int = 300
    max_test_identities: int = 100
    max_images_per_identity: int = 20
    progress: bool = True


@dataclass
class DemoResult:
    """What a finished demo wrote and measured.

    report: ``report.html``; metrics_path: ``metrics.json``; metrics: its content (before JSON
    cleaning); model_package: the trained model folder; seconds: wall time of each phase.
    """

    out_dir: Path
    report: Path
    metrics_path: Path
    metrics: dict
    model_package: Path
    seconds: dict[str, float]


@dataclass
class HeldOutSet:
    """Evaluation images kept in memory: ``set[i]`` -> uint8 (3, S, S) RGB.

    images: uint8 (N, 3, S, S); labels: (N,) int64 identity per image; severity: (N,) float32
    recorded degradation severity in [0, 1] (0 = clean); description: what the images are.
    """

    images: torch.Tensor
    label_array: np.ndarray
    severity: np.ndarray
    description: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def labels(self) -> np.ndarray:
        """(N,) int64 identity labels (what ``make_pairs`` reads)."""
        return self.label_array

    @property
    def num_identities(self) -> int:
        return int(len(np.unique(self.label_array)))


# --------------------------------------------------------------------------- small helpers


def choose_threads(requested: int = 0) -> int:
    """Torch intra-op threads for the demo: ``requested`` when > 0, else the idle cores.

    Idle cores = CPU count minus the 1-minute load average, at least 1. Extra threads on busy
    cores cost far more than they give for a network this small (spin-waiting at barriers).
    """
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def _console():
    return console


def _phase(number: int, name: str) -> None:
    _console().print(f"[bold cyan]demo {number}/4: {name}[/]")


def _progress(enabled: bool):
    return make_progress(enabled=enabled)


def default_config_path() -> Path:
    """The shipped ``configs/demo_nano.yaml``; ``DemoError`` when it is missing."""
    if not DEFAULT_CONFIG.is_file():
        raise DemoError(f"{DEFAULT_CONFIG}: the demo config is missing from this installation; "
                        "pass --config FILE")
    return DEFAULT_CONFIG


def load_demo_config(options: DemoOptions):
    """The training config of the demo: the file, ``options.overrides``, then length and seed.

    Returns a ``qualiface.config.TrainingConfig``; raises ``ConfigError`` for a bad file/key.
    """
    if options.steps < 0 or options.epochs < 0:
        raise DemoError(f"--steps and --epochs must be >= 0, got {options.steps}, "
                        f"{options.epochs}")
    if options.steps > 0 and options.epochs > 0:
        raise DemoError("give --steps or --epochs, not both")
    # Checked here, before any data is made or a step trained: --num-pairs is first used by the
    # evaluation after training, which then failed (minutes later) on a count make_pairs refuses;
    # a negative --threads silently meant "pick from the load", as 0 does.
    if options.num_pairs < 0 or options.num_pairs == 1:
        raise DemoError(f"--num-pairs must be 0 (the config's val.num_pairs) or >= 2, got "
                        f"{options.num_pairs}")
    if options.threads < 0:
        raise DemoError(f"--threads must be >= 0 (0: the idle cores), got {options.threads}")
    path = Path(options.config) if options.config is not None else default_config_path()
    cfg = load_config(path, list(options.overrides))
    if options.steps > 0:
        cfg.train.steps = int(options.steps)
    if options.epochs > 0:
        cfg.train.epochs, cfg.train.steps = float(options.epochs), 0
    if options.seed is not None:
        if options.seed < 0:
            raise DemoError(f"--seed must be >= 0, got {options.seed}")
        cfg.train.seed = cfg.val.seed = int(options.seed)
        if cfg.data.name == "synthetic":
            cfg.data.params["seed"] = int(options.seed)
        if cfg.val.kind == "synthetic":
            cfg.val.params["seed"] = int(options.seed)
    if cfg.head.name != "qcface":
        # Not an error: any head trains; but the report's words assume a QCFace quality.
        _console().print(f"[yellow]note:[/] {path} trains head '{cfg.head.name}', not qcface")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"{path}: train.batch_size must be >= 2 (BatchNorm), got "
                          f"{cfg.train.batch_size}")
    return cfg


def model_input_size(cfg) -> int:
    """Side of the square model input: ``model.params.input_size`` or the 112 default."""
    return int(cfg.model.params.get("input_size", IMAGE_SIZE))


def _resize(size: int):
    return resize_to(size)


# --------------------------------------------------------------------------- synthetic data


def synthetic_held_out(cfg, *, progress: bool = True) -> HeldOutSet:
    """Render the held-out synthetic identities (the config's ``val.params``, ``split: test``).

    Without a synthetic ``val`` section the training params are reused with ``split: test``;
    the test split's identities are disjoint from the training split's for the same seed.
    """
    params = dict(cfg.val.params) if cfg.val.kind == "synthetic" else dict(cfg.data.params)
    params["split"] = "test"
    dataset = build_dataset("synthetic", **params)
    size = model_input_size(cfg)
    resize = _resize(size)
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8)
    with _progress(progress) as bar:
        task = bar.add_task("rendering held-out faces", total=len(dataset))
        for i in range(len(dataset)):
            images[i] = resize(dataset[i][0])
            bar.advance(task)
    c = dataset.config
    text = (f"{c.num_identities} held-out synthetic identities x {c.images_per_identity} "
            f"images (seed {c.seed}, {c.image_size} px, {round(100 * c.degradation_probability)}% "
            f"degraded)")
    return HeldOutSet(images, dataset.labels(), dataset.severities(), text)


def synthetic_training_summary(cfg) -> dict:
    """What the trainer will render for a synthetic ``data`` section (no rendering here)."""
    c = SyntheticConfig(**cfg.data.params)
    return {"source": "embedded synthetic faces (qualiface.data.synthetic)",
            "train_identities": c.num_identities,
            "train_images": c.num_identities * c.images_per_identity,
            "train_degraded_share": c.degradation_probability, "image_size": c.image_size,
            "seed": c.seed}


# --------------------------------------------------------------------------- real data


def open_image_source(path: Path):
    """An image folder (``root/<identity>/<image>``) or an InsightFace ``.rec`` -> dataset.

    Returns ``(dataset, format_name)``; ``DemoError`` when the path holds neither.
    """
    path = Path(path)
    if not path.exists() and not path.with_name(path.name + ".rec").is_file():
        raise DemoError(f"{path}: --data not found (give an image folder root/<identity>/<image> "
                        "or an InsightFace .rec)")
    is_rec = path.suffix in (".rec", ".idx") or not path.exists() or (
        path.is_dir() and any(path.glob("*.rec")))
    if is_rec:
        return RecordIODataset(path), "recordio"
    if not path.is_dir():
        raise DemoError(f"{path}: --data must be a folder root/<identity>/<image> or a .rec file")
    return ImageFolderDataset(path), "image folder"


def image_labels(dataset) -> np.ndarray:
    """(N,) int64 label of every image of a folder or RecordIO dataset, without decoding."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # ImageFolderDataset
        return np.fromiter((label for _, label in samples), np.int64, len(samples))
    # RecordIO: header labels only (read_raw skips the decode).
    return np.fromiter((dataset.read_raw(i)[1] for i in range(len(dataset))), np.int64,
                       len(dataset))


@dataclass
class IdentitySplit:
    """Dataset indices of the training and held-out images (identities disjoint)."""

    train: np.ndarray  # (N_train,) int64, grouped by identity
    test: np.ndarray  # (N_test,) int64
    train_labels: np.ndarray  # (N_train,) new labels 0..K-1, non-decreasing
    test_labels: np.ndarray  # (N_test,) new labels 0..T-1


def split_identities(labels: np.ndarray, *, test_fraction: float, max_train: int, max_test: int,
                     max_images: int, seed: int) -> IdentitySplit:
    """Seeded identity split of ``labels`` (N,): held-out identities get >= 2 images each.

    The held-out count is ``round(test_fraction * identities)``, at least 2, at most
    ``max_test``; the others train (at most ``max_train``). Each identity keeps its first
    ``max_images`` images (file / record order).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DemoError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if min(max_train, max_test, max_images) < 1:
        raise DemoError("the identity and image caps must be >= 1")
    identities, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 0xDE30])
    eligible = rng.permutation(identities[counts >= 2])
    wanted = min(max_test, max(2, round(test_fraction * len(identities))))
    if len(eligible) < 2 or len(identities) - min(wanted, len(eligible)) < 2:
        raise DemoError(f"{len(identities)} identities ({len(eligible)} with >= 2 images): the "
                        "demo needs >= 2 held-out identities with 2+ images and >= 2 to train on")
    test_ids = np.sort(eligible[:wanted])
    rest = np.setdiff1d(identities, test_ids)
    train_ids = np.sort(rng.permutation(rest)[:max_train])

    def take(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices, new_labels = [], []
        for new_label, identity in enumerate(chosen):
            members = np.flatnonzero(labels == identity)[:max_images]
            indices.append(members)
            new_labels.append(np.full(len(members), new_label, np.int64))
        return np.concatenate(indices), np.concatenate(new_labels)

    train, train_labels = take(train_ids)
    test, test_labels = take(test_ids)
    return IdentitySplit(train, test, train_labels, test_labels)


def write_training_rec(dataset, indices: np.ndarray, labels: np.ndarray, prefix: Path, size: int,
                       *, progress: bool = True) -> Path:
    """Decode, resize to ``size`` and JPEG-encode (q95) the training images into ``prefix.rec``.

    Returns the ``.rec`` path. Labels must be non-decreasing (grouped by identity).
    """
    resize = _resize(size)
    with RecordIOWriter(prefix, image_size=(size, size)) as writer, _progress(progress) as bar:
        task = bar.add_task("writing training images", total=len(indices))
        for index, label in zip(indices.tolist(), labels.tolist()):
            writer.add(encode_jpeg(resize(dataset[index][0]), quality=95), label)
            bar.advance(task)
    return writer.rec_path


def degraded_held_out(dataset, indices: np.ndarray, labels: np.ndarray, size: int, seed: int,
                      description: str, *, progress: bool = True) -> HeldOutSet:
    """Decode and resize held-out images, then degrade them with the synthetic set's mix.

    The mix (kinds, per-kind probability, clean share, severity range) is
    ``SyntheticConfig``'s default, so real and synthetic demos are degraded alike; each image's
    combined severity is recorded.
    """
    mix = SyntheticConfig()
    degradation = CompositeDegradation(CompositeConfig.uniform(
        kinds=mix.degradation_kinds, probability=mix.kind_probability,
        severity_range=(0.0, mix.max_severity),
        clean_probability=1.0 - mix.degradation_probability))
    generator = torch.Generator().manual_seed(seed)
    plan = degradation.sample_plan(len(indices), generator)
    resize = _resize(size)
    images = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    with _progress(progress) as bar:
        task = bar.add_task("decoding + degrading held-out images", total=len(indices))
        for row, index in enumerate(indices.tolist()):
            image = resize(dataset[index][0])
            if bool((plan[row] > 0).any()):
                image = degradation.apply_plan(image, plan[row : row + 1], generator)
            images[row] = image
            bar.advance(task)
    severity = degradation.combine(plan).numpy().astype(np.float32)
    return HeldOutSet(images, labels.astype(np.int64), severity, description)


def prepare_real_data(cfg, options: DemoOptions, data_dir: Path, seed: int) -> tuple[HeldOutSet, dict]:
    """Split ``options.data`` by identity, write the training ``.rec``, point ``cfg.data`` at it.

    Returns ``(held-out set, data summary for the report)``; ``cfg`` is changed in place.
    """
    source = Path(options.data)
    dataset, kind = open_image_source(source)
    labels = image_labels(dataset)
    split = split_identities(labels, test_fraction=options.test_fraction,
                             max_train=options.max_train_identities,
                             max_test=options.max_test_identities,
                             max_images=options.max_images_per_identity, seed=seed)
    size = model_input_size(cfg)
    claim_folder(data_dir)
    rec = write_training_rec(dataset, split.train, split.train_labels, data_dir / "train", size,
                             progress=options.progress)
    cfg.data.name = "recordio"
    cfg.data.params = {"path": str(rec)}
    num_train_ids = int(split.train_labels[-1]) + 1
    num_test_ids = int(split.test_labels[-1]) + 1
    description = (f"{num_test_ids} held-out identities ({len(split.test)} images) of {source}, "
                   f"degraded with the synthetic mix")
    held_out = degraded_held_out(dataset, split.test, split.test_labels, size, seed,
                                 description, progress=options.progress)
    summary = {"source": str(source), "format": kind,
               "identities_in_source": int(len(np.unique(labels))),
               "images_in_source": int(len(labels)),
               "train_identities": num_train_ids, "train_images": int(len(split.train)),
               "train_copy": str(rec), "image_size": size, "split_seed": seed,
               "note": "training images as given (resized); held-out images degraded with the "
                       "synthetic degradation mix, severity recorded"}
    return held_out, summary


# --------------------------------------------------------------------------- training


#: Files ``write_report`` puts at the top of ``--out``; a demo replaces them only in a folder an
#: earlier demo wrote (its ``train/`` carries ``MARKER``).
REPORT_FILES = ("report.html", "report.md", "metrics.json", "curves.json")


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` holding another run's report (``qualiface eval``'s, say) before any
    work: the demo would overwrite its ``report.html`` and ``metrics.json`` without asking."""
    if (out / "train" / MARKER).is_file():
        return  # an earlier demo's output: the next demo run replaces it
    found = [name for name in REPORT_FILES if (out / name).exists()]
    if found:
        raise DemoError(f"{out}: holds {', '.join(found)} not written by qualiface demo; "
                        "choose another --out")


def claim_folder(folder: Path) -> Path:
    """Empty ``folder`` for this run: create it, or clear a folder an earlier demo made.

    The demo marks its sub-folders (``MARKER``) and only ever deletes marked ones, so an
    ``--out`` that happens to hold the user's own ``train/`` or ``data/`` is refused instead.
    """
    if folder.exists():
        if not folder.is_dir():
            raise DemoError(f"{folder}: exists and is not a folder; choose another --out")
        if not (folder / MARKER).is_file():
            if any(folder.iterdir()):
                raise DemoError(f"{folder}: exists and was not written by qualiface demo; "
                                "choose another --out")
        else:
            shutil.rmtree(folder)  # an earlier demo's output (metrics.jsonl would be appended)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by qualiface demo; deleted by the next demo run\n")
    return folder


def training_summary(result, seconds: float) -> dict:
    """Steps, final training metrics and the loss curve (from ``metrics.jsonl``).

    ``loss_curve``: ``qualiface.train.report.loss_curve``: ``step`` and total ``loss`` per
    logged step, each loss term logged (QCFace: ``identity_loss``, the margin loss alone, and
    ``norm_loss``), ``phase_changes`` and ``norm_prior_from`` (first step whose loss includes
    the norm prior), because switching the prior on makes the total jump.
    """
    curve = loss_curve(read_metrics(result.out_dir / "metrics.jsonl"))
    last = {k: v for k, v in result.last_metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"steps": result.global_step, "seconds": seconds,
            "final": {k: last[k] for k in ("loss", "acc", "norm", "norm_loss", "lr") if k in last},
            "model_package": str(result.model_package),
            "loss_curve": curve}


# --------------------------------------------------------------------------- evaluation


def severity_bins(severity: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``[(label, mask (N,) bool)]``: clean (severity 0), then the ``SEVERITY_BIN_EDGES`` bins."""
    bins = [("clean", severity <= 0)]
    low = 0.0
    for high in SEVERITY_BIN_EDGES:
        bins.append((f"severity {low:.2f}-{high:.2f}", (severity > low) & (severity <= high)))
        low = high
    return [(label, mask) for label, mask in bins if mask.any()]


def fnmr_after_discard(curve, fraction: float) -> float:
    """FNMR of an EDC step curve once ``fraction`` of the comparisons is discarded."""
    position = int(np.searchsorted(curve.discard_fractions, fraction + 1e-12, side="right")) - 1
    return float(curve.errors[max(position, 0)])


def evaluate_held_out(model_package: Path, held_out: HeldOutSet, *, num_pairs: int, seed: int,
                      progress: bool = True):
    """Embed the held-out set and evaluate verification and quality.

    Returns ``qualiface.eval.benchmarks.PairResult`` with ``vs_severity`` rank correlations
    for the model quality and the feature norm and a per-severity quality histogram added.
    """
    embed_fn, model_id = package_embed_fn(model_package)
    ids = [str(i) for i in range(len(held_out))]
    features = extract_features(held_out, embed_fn, ids=ids, flip="none", progress=progress,
                                description="embedding held-out faces",
                                meta={"model": model_id})
    first, second, issame = make_pairs(held_out, num_pairs, seed)
    bench = PairBenchmark("held-out identities", held_out, ids, first, second,
                          np.asarray(issame, dtype=bool), None, held_out.description)
    # Severity is continuous, so it is not passed on: evaluate_pairs would draw one histogram
    # series per distinct value. Correlations use the raw values, the histogram uses bins.
    result = evaluate_pairs(bench, features)
    _, norms = l2_normalize(features.features)
    per_image = {"model quality": features.quality.astype(np.float64),
                 "feature norm": norms.astype(np.float64)}
    for name, values in per_image.items():
        result.metrics["quality"][name]["vs_severity"] = rank_correlations(values,
                                                                           held_out.severity)
    result.histograms[SEVERITY_PLOT_TITLE] = {
        label: per_image["model quality"][mask] for label, mask in severity_bins(held_out.severity)}
    return result


def report_plots(training: dict, evaluation) -> tuple[dict, dict]:
    """The demo's extra report plots: ``(lines, boxes)`` for ``EvalReport``.

    lines: the training loss against the optimizer step (``training["loss_curve"]``: the total
    and each logged term, phase changes marked);
    boxes: the model quality of the held-out images per severity bin (the same groups as the
    per-severity histogram of ``evaluate_held_out``).
    """
    lines = {LOSS_PLOT_TITLE: loss_plot(training["loss_curve"])}
    boxes = {SEVERITY_PLOT_TITLE: evaluation.histograms[SEVERITY_PLOT_TITLE]}
    return lines, boxes


def headline(result, severity_key: str = "model quality") -> dict:
    """The numbers the console and the top of the report show (flat, JSON-ready)."""
    v = result.metrics["verification"]
    q = result.metrics["quality"][severity_key]
    out = {"accuracy": v.get("accuracy"), "accuracy_std": v.get("accuracy_std"),
           "auc": v["auc"], "eer": v["eer"]}
    out.update({f"tar@far={k}": t for k, t in v["tar_at_far"].items() if k in ("1e-03", "1e-02")})
    out["spearman_quality_vs_severity"] = q["vs_severity"]["spearman"]
    out["spearman_norm_vs_severity"] = result.metrics["quality"]["feature norm"]["vs_severity"][
        "spearman"]
    for label, curve in result.edcs.items():
        if label.startswith(severity_key):
            fmr = f"{curve.fmr:g}"
            out[f"edc_fnmr@fmr={fmr}"] = curve.starting_error
            out[f"edc_fnmr@fmr={fmr}_after_{round(100 * EDC_QUOTE_FRACTION)}pct_discard"] = (
                fnmr_after_discard(curve, EDC_QUOTE_FRACTION))
    return out


# --------------------------------------------------------------------------- the job


def run_demo(options: DemoOptions) -> DemoResult:
    """Train, evaluate and report (see the module docstring); returns what was written.

    Raises ``DemoError``, ``qualiface.config.ConfigError``, data errors
    (``qualiface.data.decode.DataError``), ``qualiface.train.loop.TrainingError`` or
    ``qualiface.eval.EvaluationError`` with a message naming the file or option at fault.
    """
    started = time.perf_counter()
    out = Path(options.out_dir)
    cfg = load_demo_config(options)
    threads = choose_threads(options.threads)
    seconds: dict[str, float] = {}
    with torch_threads(threads):
        _console().print(f"qualiface demo -> {out} (torch threads: {threads})")
        phase_start = time.perf_counter()
        _phase(1, "generating data")
        make_folder(out)  # FileWriteError (one line in the CLI) when --out is below a file
        check_out_folder(out)
        seed = cfg.train.seed
        if options.data is not None:
            held_out, data_summary = prepare_real_data(cfg, options, out / "data", seed)
        else:
            if cfg.data.name != "synthetic":
                raise DemoError(f"the demo config trains on '{cfg.data.name}'; without --data "
                                "it needs data.name: synthetic")
            size = model_input_size(cfg)
            data_size = int(cfg.data.params.get("image_size", size))
            if data_size != size:
                raise DemoError(f"data.params.image_size ({data_size}) differs from "
                                f"model.params.input_size ({size}); set both to the same value")
            held_out = synthetic_held_out(cfg, progress=options.progress)
            data_summary = synthetic_training_summary(cfg)
        data_summary.update({"test": held_out.description, "test_identities":
                             held_out.num_identities, "test_images": len(held_out)})
        train_images = int(data_summary["train_images"])
        if train_images < cfg.train.batch_size:  # a tiny --data folder: one step per epoch
            cfg.train.batch_size = max(2, train_images)
        num_pairs = options.num_pairs or cfg.val.num_pairs
        pair_seed = cfg.val.seed
        cfg.val.kind = "none"  # the demo evaluates the finished model itself, on more pairs
        seconds["generating data"] = time.perf_counter() - phase_start

        phase_start = time.perf_counter()
        _phase(2, "training")

        train_dir = claim_folder(out / "train")
        cfg.train.output_dir = str(train_dir)
        cfg.train.progress = options.progress
        result = train(cfg, out_dir=train_dir)
        if result.model_package is None:
            raise DemoError(f"{train_dir}: training wrote no model package (is "
                            "qualiface.infer.model importable?)")
        seconds["training"] = time.perf_counter() - phase_start
        training = training_summary(result, seconds["training"])

        phase_start = time.perf_counter()
        _phase(3, "evaluating")
        evaluation = evaluate_held_out(result.model_package, held_out, num_pairs=num_pairs,
                                       seed=pair_seed, progress=options.progress)
        seconds["evaluating"] = time.perf_counter() - phase_start

        phase_start = time.perf_counter()
        _phase(4, "writing report")

        summary = headline(evaluation)
        metrics = {
            "summary": summary,
            "model": {"backbone": cfg.model.backbone, "head": cfg.head.name,
                      "input_size": model_input_size(cfg),
                      "embedding_size": cfg.model.params.get("embedding_size"),
                      **({"quality_note": QCFACE_NOTE} if cfg.head.name.startswith("qcface")
                         else {})},
            "data": data_summary,
            "training": training,
            **evaluation.metrics,
            "run": {"config": str(options.config or DEFAULT_CONFIG), "seed": seed,
                    "torch_threads": threads, "cpu_count": os.cpu_count(),
                    "load_average_1min": _load_average(),
                    "seconds": {**seconds, "before_report": time.perf_counter() - started}},
        }
        where = "synthetic faces" if options.data is None else Path(options.data).name
        # Short: the plots put the title above a 6.4-inch axis.
        title = f"demo: {cfg.head.name}/{cfg.model.backbone} on {where}"
        lines, boxes = report_plots(training, evaluation)
        write_report(EvalReport(title, metrics, evaluation.rocs, evaluation.edcs,
                                evaluation.histograms, lines=lines, boxes=boxes,
                                captions={LOSS_PLOT_TITLE: LOSS_CAPTION,
                                          SEVERITY_PLOT_TITLE: SEVERITY_CAPTION}), out)
        seconds["writing report"] = time.perf_counter() - phase_start
    seconds["total"] = time.perf_counter() - started
    _print_summary(summary, out, seconds["total"])
    return DemoResult(out, out / "report.html", out / "metrics.json", metrics,
                      Path(result.model_package), seconds)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _format_percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%"


def _print_summary(summary: dict, out: Path, seconds: float) -> None:
    console = _console()
    parts = [f"accuracy {_format_percent(summary.get('accuracy'))}",
             f"AUC {summary['auc']:.3f}", f"EER {_format_percent(summary['eer'])}"]
    if "tar@far=1e-03" in summary:
        parts.append(f"TAR@FAR=1e-3 {_format_percent(summary['tar@far=1e-03'])}")
    parts.append(f"Spearman(quality, severity) {summary['spearman_quality_vs_severity']:+.3f}")
    console.print("held-out: " + ", ".join(parts))
    edc = [(k, v) for k, v in summary.items() if k.startswith("edc_fnmr@fmr=")]
    if edc:
        console.print("EDC (model quality): " + ", ".join(
            f"{k.removeprefix('edc_')} {_format_percent(v)}" for k, v in edc))
    console.print(f"[bold green]report:[/] {out / 'report.html'}  ({seconds:.0f} s in all)")
