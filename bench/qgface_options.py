"""The effect of each QGFace structure option (issue 12), measured on the synthetic faces.

QGFace's defaults follow the authors' published training code; the earlier structure stays
reachable through five head options (``qualiface.heads.qgface``). This script trains the same
short CPU run once per variant with the project's own trainer (``qualiface.train.loop.train``:
the qgface pipeline's degraded second view, poly schedule, model package) and evaluates every
model package on held-out synthetic identities exactly as ``qualiface demo`` does
(``demo.evaluate_held_out``): verification accuracy and AUC on balanced pairs, and the Spearman
correlation of the model quality (the feature norm) with each image's recorded severity
(negative = quality falls as degradation grows, the wanted direction).

Variants: ``old`` (every option at its earlier value), ``new`` (the defaults), and ``new`` with
one option set back to its earlier value (``new-enqueue-after`` ...), plus the authors'
zero-initialised norm statistics, and ArcFace trained the same way as a reference. A difference
between two rows is the effect of that option at this scale, for one seed and 4,000 pairs.

    python bench/qgface_options.py            # ~9 minutes on one thread
    python bench/qgface_options.py --steps 20 --variants old,new   # a quick check

Writes ``bench/results/qgface_options.json`` and prints the table (docs/BENCHMARKS.md); beside the
JSON, accuracy and Spearman per variant as bar charts (``.png``, same stem) and a ``.md`` file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

#: The earlier structure of the head (before issue 12).
OLD = {"enqueue_first": False, "classify_both_views": False, "split_by": "first",
       "symmetric": False}
#: name -> (head params, what it is). "new" is the head's defaults; the others change one thing.
#: ``None``: the reference row, ArcFace with the same run (no second view, no queue).
VARIANTS = {
    "arcface": (None, "reference: ArcFace, same run"),
    "old": (OLD, "every option at its earlier value"),
    "new": ({}, "the defaults (the authors' structure)"),
    "new-enqueue-after": ({"enqueue_first": False}, "new, but enqueue after the loss"),
    "new-classify-first": ({"classify_both_views": False},
                           "new, but classify the first view only"),
    "new-split-first": ({"split_by": "first"}, "new, but LQ/HQ by the first view's quality"),
    "new-one-way": ({"symmetric": False}, "new, but the contrastive loss one way only"),
    "new-zero-stats": ({"initial_statistics": "zero"},
                       "new, statistics from 0 (the authors' buffers)"),
}

def variant_config(params: dict, args):
    """The demo's nano config turned into a short QGFace (``params``) run at ``args.input`` px."""
    from qualiface.config import load_config
    from qualiface.demo import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, [])
    cfg.model.params.update(input_size=args.input, learnable_embedding_scale=False)
    if params is None:
        cfg.head.name, cfg.head.params, cfg.pipeline.name = "arcface", {}, "none"
    else:
        cfg.head.name, cfg.head.params = "qgface", {"queue_size": args.queue_size, **params}
        cfg.pipeline.name = "qgface"
    for section in (cfg.data.params, cfg.val.params):
        section.update(image_size=args.input, seed=args.seed)
    cfg.data.params.update(num_identities=args.identities)
    cfg.val.params.update(num_identities=args.test_identities)
    cfg.data.num_workers = 0
    cfg.train.seed = cfg.val.seed = args.seed
    cfg.train.steps, cfg.train.epochs = args.steps, 0
    cfg.train.batch_size = args.batch_size
    cfg.train.progress = False
    cfg.train.checkpoint_every = 0
    return cfg


def run_variant(name: str, params: dict, held_out, args, work: Path) -> dict:
    from qualiface.demo import evaluate_held_out
    from qualiface.train.loop import train

    cfg = variant_config(params, args)
    num_pairs, pair_seed = cfg.val.num_pairs, cfg.val.seed
    cfg.val.kind = "none"
    out_dir = work / name
    cfg.train.output_dir = str(out_dir)
    start = time.perf_counter()
    result = train(cfg, out_dir=out_dir)
    train_seconds = time.perf_counter() - start
    evaluation = evaluate_held_out(result.model_package, held_out, num_pairs=num_pairs,
                                   seed=pair_seed, progress=False)
    verification = evaluation.metrics["verification"]
    quality = evaluation.metrics["quality"]["model quality"]["vs_severity"]
    last = result.last_metrics
    row = {
        "variant": name,
        "meaning": VARIANTS[name][1],
        "head_params": cfg.head.params,
        "accuracy": verification.get("accuracy"),
        "auc": verification["auc"],
        "spearman_quality_vs_severity": quality["spearman"],
        "final_loss": last.get("loss"),
        "fraction_low_quality": last.get("fraction_low_quality"),
        "train_seconds": train_seconds,
    }
    print(f"{name}: acc {common.fmt(row['accuracy'], percent=True)} %, spearman "
          f"{common.fmt(row['spearman_quality_vs_severity'])} ({train_seconds:.0f} s)",
          flush=True)
    return row


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "meaning", "accuracy %", "AUC", "Spearman(quality, severity)",
              "final loss", "LQ fraction (last step)"]
    body = [[r["variant"], r["meaning"], common.fmt(r["accuracy"], percent=True),
             common.fmt(r["auc"]), common.fmt(r["spearman_quality_vs_severity"]),
             common.fmt(r["final_loss"]), common.fmt(r["fraction_low_quality"], 2)]
            for r in rows]
    return header, body


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input", type=int, default=32, help="face and model input size (px)")
    parser.add_argument("--identities", type=int, default=60, help="training identities")
    parser.add_argument("--test-identities", type=int, default=60)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "qgface_options.json"))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise common.BenchError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.steps <= 0 or args.batch_size < 2:
        raise common.BenchError("--steps must be > 0 and --batch-size >= 2")
    args.variant_names = names
    return args


def main(argv=None) -> dict:
    import torch

    from qualiface.demo import synthetic_held_out

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out = synthetic_held_out(variant_config({}, args), progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgface_options_") as work:
        for name in args.variant_names:
            rows.append(run_variant(name, VARIANTS[name][0], held_out, args, Path(work)))
    header, body = table(rows)
    payload = {
        "benchmark": "qgface_options",
        "description": "QGFace structure options, short CPU run on synthetic faces "
                       "(iresnet-nano); held-out verification and quality vs severity",
        "settings": {k: v for k, v in vars(args).items() if k != "variant_names"},
        "held_out": held_out.description,
        "rows": rows,
        "markdown": common.markdown_table(header, body),
        **common.provenance(),
    }
    common.write_json(args.out, payload)
    common.print_table(f"QGFace options ({args.steps} steps, {args.input} px, seed {args.seed})",
                       header, body)
    print(f"wrote {args.out}")
    figures = common.write_figures(
        args.out, f"QGFace options ({args.steps} steps, {args.input} px, seed {args.seed})",
        [("held-out accuracy %", {r["variant"]: None if r["accuracy"] is None else
                                  100 * r["accuracy"] for r in rows}, False),
         ("Spearman(quality, severity)", {r["variant"]: r["spearman_quality_vs_severity"]
                                          for r in rows}, False)],
        payload["markdown"])
    if figures:
        print(f"wrote {figures[0]} and {figures[1]}")
    return payload


if __name__ == "__main__":
    sys.exit(common.run_main(main))
