"""Component speeds on this machine (CPU): decoding, RecordIO, synthetic faces, a training step
of the demo backbone, gallery search. One command, one table, JSON in ``bench/results/``, and
beside it the measures as bar charts by unit (``.png``, same stem) and a ``.md`` with the table.

    python bench/components.py                       # uses ../shared/data when present
    python bench/components.py --out bench/results/components.json

Every stage times the library's own code on fixed inputs (seeded); the RecordIO and decode
stages use real LFW crops from ``../shared/data`` when present and synthetic faces otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS_DIR, SHARED_DATA, markdown_table, print_table, provenance,  # noqa: E402
                    run_main, write_figures, write_json)


def _rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def _face_jpegs(count: int) -> tuple[list[bytes], str]:
    """``count`` JPEG-encoded 112x112 faces: real LFW crops when the shared data is there."""
    from qualiface.data.decode import encode_jpeg

    lfw = SHARED_DATA / "lfw" / "aligned112"
    if lfw.is_dir():
        paths = sorted(lfw.glob("*/*.jpg"))[:count]
        return [p.read_bytes() for p in paths], f"{len(paths)} LFW crops"
    from qualiface.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=count // 10 + 1, images_per_identity=10, seed=0)
    return [encode_jpeg(faces[i][0]) for i in range(count)], f"{count} synthetic faces"


def time_decode(jpegs: list[bytes]) -> dict:
    from qualiface.data.decode import decode_image

    out = {}
    for backend in ("cv2", "pil"):
        for data in jpegs[:20]:  # warm-up: library initialisation is not per-image cost
            decode_image(data, backend=backend)
        started = time.perf_counter()
        for data in jpegs:
            decode_image(data, backend=backend)
        out[f"decode_{backend}_us_per_image"] = 1e6 * (time.perf_counter() - started) / len(jpegs)
    return out


def time_recordio(jpegs: list[bytes], folder: Path) -> dict:
    from qualiface.data.recordio import RecordIODataset, RecordIOWriter

    prefix = folder / "bench"
    started = time.perf_counter()
    with RecordIOWriter(prefix) as writer:
        for k, data in enumerate(jpegs):
            writer.add(data, k // 10)
    write_s = time.perf_counter() - started
    dataset = RecordIODataset(prefix)
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset.read_raw(i)
    raw_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    decode_s = time.perf_counter() - started
    return {"recordio_write_img_per_s": _rate(len(jpegs), write_s),
            "recordio_raw_records_per_s": _rate(len(dataset), raw_s),
            "recordio_read_decode_img_per_s": _rate(len(dataset), decode_s)}


def time_synthetic(count: int) -> dict:
    from qualiface.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=count // 10 + 1, images_per_identity=10, seed=0)
    started = time.perf_counter()
    for i in range(count):
        faces.image(i, degraded=False)
    clean_s = time.perf_counter() - started
    started = time.perf_counter()
    faces.render_batch(range(count))
    batch_s = time.perf_counter() - started
    return {"synthetic_clean_ms_per_image": 1e3 * clean_s / count,
            "synthetic_degraded_batch_ms_per_image": 1e3 * batch_s / count}


def time_training_step(batch: int, steps: int) -> dict:
    """fwd + bwd + SGD step of the demo backbone (iresnet-nano, 112 px) with an ArcFace head."""
    import torch

    from qualiface.backbones import build_backbone
    from qualiface.heads import build_head

    out = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        net = build_backbone("iresnet-nano")
        head = build_head("arcface", 512, 1000)
        params = list(net.parameters()) + list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, 112, 112)
        labels = torch.randint(0, 1000, (batch,))
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for step in range(steps + 1):  # the first step warms up allocators and is not timed
            if step == 1:
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            head(net(x), labels).loss.backward()
            optimizer.step()
        out[f"nano_train_{layout}_img_per_s"] = _rate(batch * steps, time.perf_counter() - started)
    return out


def time_search(gallery_size: int, queries: int, dim: int = 128) -> dict:
    import numpy as np

    from qualiface.infer.search import Gallery

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(gallery_size // 50, dim)).astype(np.float32)
    gallery = centres[rng.integers(len(centres), size=gallery_size)]
    gallery += 0.3 * rng.normal(size=gallery.shape).astype(np.float32)
    probes = gallery[rng.integers(gallery_size, size=queries)]
    probes = probes + 0.1 * rng.normal(size=probes.shape).astype(np.float32)
    ids = [str(i) for i in range(gallery_size)]
    out = {}
    exact = Gallery.build(ids, gallery, backend="exact")
    started = time.perf_counter()
    truth = exact.search(probes, k=10)
    out["search_exact_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ivf = Gallery.build(ids, gallery, backend="ivf", nprobe=8)
    out["search_ivf_build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    found = ivf.search(probes, k=10)
    out["search_ivf_nprobe8_s"] = time.perf_counter() - started
    hits = [len(set(a) & set(b)) / 10 for a, b in zip(truth.indices.tolist(), found.indices.tolist())]
    out["search_ivf_nprobe8_recall_at_10"] = float(np.mean(hits))
    return out


#: Figure panels of ``results``: (title, key suffix); a key goes to the first suffix it ends with.
PANELS = (("throughput (items/s, log scale)", "_per_s"),
          ("microseconds per image", "_us_per_image"),
          ("milliseconds per image", "_ms_per_image"),
          ("seconds", "_s"),
          ("recall@10", "_recall_at_10"))


def figure_panels(results: dict) -> list[tuple]:
    """``results`` grouped by unit for ``write_figures`` (one bar chart per unit)."""
    groups: dict[str, dict[str, float]] = {title: {} for title, _ in PANELS}
    for key, value in results.items():
        title, suffix = next(((t, s) for t, s in PANELS if key.endswith(s)), ("other", ""))
        groups.setdefault(title, {})[key[: len(key) - len(suffix)] if suffix else key] = value
    return [(title, values, title.endswith("log scale)")) for title, values in groups.items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640, help="images for decode/RecordIO/synthetic")
    parser.add_argument("--batch", type=int, default=64, help="training-step batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per layout")
    parser.add_argument("--gallery", type=int, default=50_000, help="gallery size for search")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "components.json"))
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    jpegs, source = _face_jpegs(args.images)
    results = {}
    results.update(time_decode(jpegs))
    with tempfile.TemporaryDirectory() as folder:
        results.update(time_recordio(jpegs, Path(folder)))
    results.update(time_synthetic(args.images))
    results.update(time_training_step(args.batch, args.steps))
    results.update(time_search(args.gallery, args.queries))
    print_table(f"components ({source}, torch threads {torch.get_num_threads()})",
                ["measure", "value"], [[k, f"{v:,.3f}" if v < 100 else f"{v:,.0f}"]
                                       for k, v in results.items()])
    payload = {**provenance("cpu"), "images": source, "settings": vars(args),
               "torch_threads": torch.get_num_threads(), "results": results}
    write_json(args.out, payload)
    print(f"wrote {args.out}", file=sys.stderr)
    figures = write_figures(args.out, f"components ({source})", figure_panels(results),
                            markdown_table(["measure", "value"],
                                           [[k, f"{v:,.3f}"] for k, v in results.items()]))
    if figures:
        print(f"wrote {figures[0]} and {figures[1]}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
