"""Training batches: a deterministic data order, an in-memory uint8 cache, and flip augmentation.

Data order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the samples in
``randperm(N, generator seeded with seed * 1_000_003 + e)``, cut into optimizer steps of
``batch_size * grad_accum * world_size`` samples (an incomplete last step is dropped). Each
step is split into ``grad_accum`` micro-steps and each micro-step into one contiguous slice per
rank. So the position inside an epoch (the step index) is all a checkpoint needs to continue
mid-epoch, and accumulating 2 micro-batches of B sees exactly the samples of one batch of 2B.

Small datasets are decoded once into one uint8 tensor (N, 3, H, W) (on the GPU when it fits),
so training never waits on JPEG decoding; larger ones stream through a DataLoader with workers
that follows the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qualiface.errors import DataError  # the one data error; importable from here as before
from qualiface.threads import torch_threads
from qualiface.train.logging import make_progress

SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs from colliding for any realistic epoch count


@dataclass(frozen=True)
class BatchPlan:
    """Which dataset indices every (epoch, step, micro-step, rank) sees."""

    indices: torch.Tensor  # (N,) int64 positions into the dataset (a subset after filtering)
    batch_size: int  # micro-batch per rank
    grad_accum: int = 1
    world_size: int = 1
    seed: int = 0

    @property
    def step_size(self) -> int:
        """Samples consumed by one optimizer step across all ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.step_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of ``indices`` (deterministic in ``seed`` and ``epoch``)."""
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=generator)]

    def micro_indices(self, order: torch.Tensor, step: int, micro: int, rank: int) -> torch.Tensor:
        """Dataset indices of one rank's micro-batch inside step ``step`` of an epoch order."""
        start = step * self.step_size + (micro * self.world_size + rank) * self.batch_size
        return order[start : start + self.batch_size]


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without blocking the host: from pageable memory a
    host-to-GPU copy synchronises the stream, from pinned memory it is queued."""
    if tensor.device == torch.device(device) or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Horizontally flip each image (B, 3, H, W) with probability ``p``.

    The coin flips come from ``generator`` (a CPU generator, checkpointed), so augmentation is
    reproducible and independent of the device the images live on.
    """
    mask = torch.rand(images.shape[0], generator=generator) < p
    mask = to_device_async(mask, images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


class _Indexed(torch.utils.data.Dataset):
    """Dataset view used by the DataLoader: item -> (image uint8, label int64)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
            raise DataError(f"sample {i}: expected a uint8 (3, H, W) tensor, got {type(image).__name__}")
        return image, torch.as_tensor(int(label), dtype=torch.int64)


def _loader(dataset, batches, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Indexed(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # A private generator: creating an iterator draws a base seed, and drawing it from the
        # global RNG would make the global random stream depend on where a run was resumed.
        generator=torch.Generator().manual_seed(0),
    )


def decode_all(dataset, *, num_workers: int = 0, batch_size: int = 256, progress: bool = True):
    """Decode a whole dataset into ``(images uint8 (N, 3, H, W), labels int64 (N,))``.

    Runs with one torch thread: per-image decode/degrade ops are tiny, and under CPU load
    multi-threading them was measured 10-30x slower (threads spin-waiting at barriers). A
    dataset with ``render_batch(indices) -> (images, labels)`` (the synthetic set; same pixels
    as indexing) is rendered ``batch_size`` samples at a time in this process when
    ``num_workers`` is 0; otherwise samples go through a DataLoader with ``num_workers``.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("the training dataset is empty")
    if batch_size < 1:
        raise DataError(f"decode batch_size must be >= 1, got {batch_size}")
    with torch_threads(1):
        first, _ = _Indexed(dataset)[0]
        images = torch.empty((n, *first.shape), dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        render_batch = getattr(dataset, "render_batch", None)
        if callable(render_batch) and num_workers == 0:
            batches = (render_batch(chunk) for chunk in chunks)
        else:
            batches = iter(_loader(dataset, chunks, num_workers))
        with make_progress(enabled=progress) as bar:
            task = bar.add_task("decoding training set", total=n)
            for chunk, (imgs, labs) in zip(chunks, batches):
                wrong_shape = imgs.shape[1:] != first.shape or len(imgs) != len(chunk)
                if wrong_shape or imgs.dtype != torch.uint8:
                    raise DataError(f"samples {chunk[0]}..{chunk[-1]}: got {len(imgs)} images of "
                                    f"{imgs.dtype} {tuple(imgs.shape[1:])}, expected {len(chunk)} "
                                    f"of uint8 {tuple(first.shape)}")
                images[chunk[0] : chunk[-1] + 1] = imgs
                labels[chunk[0] : chunk[-1] + 1] = labs
                bar.advance(task, len(chunk))
    return images, labels


def data_fingerprint(dataset) -> dict:
    """What a checkpoint records of its training data, so a resume can tell other data.

    The label of every index must mean what it meant when the checkpoint was written: a
    renamed, added or removed identity folder shifts every later label, and the resumed run
    would train the saved classifier rows on other people without a word. ``samples_sha256``
    is the dataset's own ``fingerprint()`` (labels and names of every sample) when it has one,
    else None (only the size and class count are compared).
    """
    fingerprint = getattr(dataset, "fingerprint", None)
    return {"size": len(dataset), "num_classes": int(dataset.num_classes),
            "samples_sha256": fingerprint() if callable(fingerprint) else None}


def data_changes(saved: dict, current: dict) -> list[str]:
    """How ``current`` (``data_fingerprint``) differs from the ``saved`` one, in words; [] when
    they agree on every key both recorded."""
    changes = []
    for key, what in (("size", "images"), ("num_classes", "classes")):
        if saved.get(key) is not None and saved.get(key) != current.get(key):
            changes.append(f"{what}: {saved[key]:,} then, {current[key]:,} now")
    if (saved.get("samples_sha256") and current.get("samples_sha256")
            and saved["samples_sha256"] != current["samples_sha256"]):
        changes.append("the images or their labels differ (added, removed, renamed or relabelled)")
    return changes


def cached_size_bytes(dataset) -> int:
    """Bytes the decoded uint8 cache of ``dataset`` would take."""
    image, _ = _Indexed(dataset)[0]
    return len(dataset) * image.numel()


class BatchSource:
    """Yields each optimizer step's micro-batches ``[(images uint8, labels int64), ...]``.

    ``cached``: images/labels in one tensor (indexing, no decoding); otherwise a DataLoader
    with workers reads the same planned indices. Steps must be requested in order within an
    epoch; jumping (resume) restarts the loader at the requested position.
    """

    def __init__(self, dataset, plan: BatchPlan, *, rank: int = 0, cache: tuple | None = None,
                 device: torch.device | None = None, num_workers: int = 0) -> None:
        if plan.steps_per_epoch < 1:
            raise DataError(
                f"{len(plan.indices)} training samples are fewer than one optimizer step "
                f"({plan.step_size} = batch_size x grad_accum x world_size)"
            )
        self.dataset = dataset
        self.plan = plan
        self.rank = rank
        self.cache = cache
        self.device = device or torch.device("cpu")
        self.num_workers = num_workers
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None
        self._iter: Iterator | None = None
        self._next_step = 0

    def _micro_lists(self, order: torch.Tensor, start_step: int):
        for step in range(start_step, self.plan.steps_per_epoch):
            for micro in range(self.plan.grad_accum):
                yield self.plan.micro_indices(order, step, micro, self.rank).tolist()

    def step(self, epoch: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of optimizer step ``step`` of ``epoch`` for this rank."""
        if epoch != self._epoch:
            self._epoch, self._order, self._iter = epoch, self.plan.epoch_order(epoch), None
        if self.cache is not None:
            images, labels = self.cache
            out = []
            for micro in range(self.plan.grad_accum):
                idx = self.plan.micro_indices(self._order, step, micro, self.rank)
                idx = to_device_async(idx, images.device)
                out.append((images[idx].to(self.device, non_blocking=True), labels[idx].to(self.device, non_blocking=True)))
            return out
        if self._iter is None or step != self._next_step:
            self._iter = iter(_loader(self.dataset, list(self._micro_lists(self._order, step)), self.num_workers))
        self._next_step = step + 1
        return [
            (imgs.to(self.device, non_blocking=True), labs.to(self.device, non_blocking=True))
            for imgs, labs in (next(self._iter) for _ in range(self.plan.grad_accum))
        ]
