"""Bad-sample policy for any dataset: count, log and skip undecodable samples, stop when too many.

A face dataset of millions of files always holds a few broken ones (truncated downloads, a
zero-byte file, an HTML error page saved as ``.jpg``, a label that does not fit). Crashing a
multi-day run on the first one is wrong, and silently training on something else is worse.
``RobustDataset`` wraps any dataset of the project contract (``__getitem__(i) -> (uint8 (3, H,
W) RGB, int label)``) and applies a ``SkipPolicy``:

* A sample whose read raises a data error (the ``DataError`` family of ``qualiface.data``:
  decode, RecordIO, manifest errors) or an ``OSError`` (missing or unreadable file), whose
  label is outside ``[0, num_classes)``, or whose size differs from ``image_size`` (see below)
  is **bad**. Every bad sample is counted and logged with its source (``meta(i)["path"]``
  plus the record number for RecordIO, else the error's own file name).
* ``on_bad="replace"`` (default, what the trainer needs: its batches have a fixed size and its
  cache one slot per index) returns sample ``j = replacement_index(i, attempt, n)`` instead, a
  pure function of ``i``, so every epoch, every worker and every resumed run substitutes the
  same sample. The substitution is counted (``replaced``), never silent.
* ``on_bad="skip"`` returns ``None``; ``collate_skipping`` drops the ``None`` entries from a
  DataLoader batch (for feature extraction and evaluation, where a shorter batch is fine).
* Once at least ``min_samples`` reads were attempted, a bad fraction above
  ``max_bad_fraction`` raises ``TooManyBadSamplesError`` listing the first offending files:
  a dataset that is 5 % broken is a pipeline problem to fix, not noise to train through.

Wrong image size: the five-point alignment is defined on 112x112 crops, so an image of
another size is almost always unaligned (a raw photo in an aligned set). With ``image_size``
set, ``wrong_size="skip"`` (default) treats it as bad; ``wrong_size="resize"`` resizes it
(bilinear, antialiased) and counts it as ``resized``, for sets known to be aligned at another
resolution. ``image_size=None`` accepts any size.

Counters live in shared memory, so reads made inside DataLoader worker processes (fork or
spawn) are counted in the parent's ``stats()`` too. Registered as the dataset ``robust``::

    data:
      name: robust
      params: {dataset: folder, params: {root: faces/}, max_bad_fraction: 0.01}
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.context
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from qualiface.data import DATASETS, build_dataset
from qualiface.data.decode import DataError

logger = logging.getLogger(__name__)

#: Bytes kept per listed offender ("source: reason"), enough for a long path and a reason.
_LISTING_SLOT = 512
# Counter slots in the shared array.
_SEEN, _BAD, _REPLACED, _RESIZED, _LISTED = range(5)
#: Bad samples logged at WARNING before the rest go to DEBUG (a 1 % bad set of millions of
#: files would otherwise bury every other message).
WARN_LIMIT = 100


class TooManyBadSamplesError(DataError):
    """More bad samples than the policy allows; the message lists counts and the first files.

    Constructible from the message alone, so a DataLoader worker can re-raise it in the parent.
    """

    def __init__(self, message: str, *, bad: int = 0, seen: int = 0,
                 first_bad: list[str] | None = None) -> None:
        super().__init__(message)
        self.bad = bad
        self.seen = seen
        self.first_bad = list(first_bad or [])


@dataclass(frozen=True)
class SkipPolicy:
    """What to do with bad samples (see the module docstring).

    max_bad_fraction: largest tolerated ``bad / attempted`` (0.01 = 1 %).
    min_samples: attempted reads before the fraction is enforced (a few bad files among the
        first dozen reads are not a verdict on the dataset).
    on_bad: ``"replace"`` (deterministic substitute, counted) or ``"skip"`` (return ``None``).
    image_size: expected ``(height, width)``, or None to accept any size.
    wrong_size: ``"skip"`` (a wrong-size image is bad) or ``"resize"`` (resize and count).
    max_listed: offending files kept for the error message and ``stats()``.
    max_replacement_tries: substitutes tried for one index before giving up.
    """

    max_bad_fraction: float = 0.01
    min_samples: int = 100
    on_bad: str = "replace"
    image_size: tuple[int, int] | None = None
    wrong_size: str = "skip"
    max_listed: int = 10
    max_replacement_tries: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if self.on_bad not in ("replace", "skip"):
            raise ValueError(f"on_bad must be 'replace' or 'skip', got {self.on_bad!r}")
        if self.wrong_size not in ("skip", "resize"):
            raise ValueError(f"wrong_size must be 'skip' or 'resize', got {self.wrong_size!r}")
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"image_size must be (height, width) positive ints, got "
                                 f"{self.image_size!r}")
            object.__setattr__(self, "image_size", size)  # a YAML list becomes a tuple
        if self.max_listed < 0 or self.max_replacement_tries < 1:
            raise ValueError("max_listed must be >= 0 and max_replacement_tries >= 1")


@dataclass(frozen=True)
class BadSampleStats:
    """Counts so far (across worker processes).

    seen: sample reads attempted (including substitutes); bad: reads that failed;
    replaced: indices answered with a substitute; resized: wrong-size images resized;
    first_bad: up to ``max_listed`` ``"source: reason"`` strings, in the order they occurred.
    """

    seen: int
    bad: int
    replaced: int
    resized: int
    first_bad: list[str]

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0


def replacement_index(index: int, attempt: int, length: int) -> int:
    """The substitute for bad sample ``index`` on try ``attempt`` (0-based): never ``index``.

    A pure function (an integer hash), so the substitute does not depend on the process, the
    epoch or where a run was resumed. Needs ``length >= 2``.
    """
    if length < 2:
        raise ValueError("a dataset of fewer than 2 samples has nothing to substitute")
    # splitmix64 finaliser: spreads consecutive indices over the whole dataset.
    x = (index * 0x9E3779B97F4A7C15 + (attempt + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return (index + 1 + x % (length - 1)) % length


class _SharedCounters:
    """Counters and the offender list in shared memory, shared with DataLoader workers."""

    def __init__(self, max_listed: int) -> None:
        self.max_listed = max_listed
        self.counts = multiprocessing.Array(ctypes.c_longlong, 5)  # carries the lock
        self.listing = multiprocessing.RawArray(ctypes.c_char, max(1, max_listed) * _LISTING_SLOT)

    def add(self, slot: int, amount: int = 1) -> int:
        with self.counts.get_lock():
            self.counts[slot] += amount
            return self.counts[slot]

    def record_bad(self, entry: str) -> tuple[int, bool]:
        """Count one bad read and list it; returns (bad count, whether to log at WARNING)."""
        data = entry.encode("utf-8", errors="replace")[: _LISTING_SLOT - 1]
        with self.counts.get_lock():
            self.counts[_BAD] += 1
            listed = self.counts[_LISTED]
            if listed < self.max_listed:
                start = listed * _LISTING_SLOT
                self.listing[start:start + len(data)] = data
                self.counts[_LISTED] = listed + 1
            return self.counts[_BAD], self.counts[_BAD] <= WARN_LIMIT

    def snapshot(self) -> BadSampleStats:
        with self.counts.get_lock():
            values = list(self.counts)
            raw = bytes(self.listing)
        first = []
        for k in range(values[_LISTED]):
            chunk = raw[k * _LISTING_SLOT:(k + 1) * _LISTING_SLOT]
            first.append(chunk.split(b"\0", 1)[0].decode("utf-8", errors="replace"))
        return BadSampleStats(values[_SEEN], values[_BAD], values[_REPLACED], values[_RESIZED],
                              first)


@dataclass(frozen=True)
class _Bad:
    """Why a read failed (``error`` is the exception, when there was one)."""

    reason: str
    error: BaseException | None = None


class RobustDataset(torch.utils.data.Dataset):
    """``dataset`` with the bad-sample ``policy`` applied (see the module docstring).

    ``len``, ``num_classes`` and ``meta`` are the wrapped dataset's; other attributes are
    forwarded too (``identities``, ``samples``...). ``stats()`` gives the counts so far and
    ``check()`` raises ``TooManyBadSamplesError`` when the policy is exceeded.
    """

    def __init__(self, dataset, policy: SkipPolicy | None = None) -> None:
        self.dataset = dataset
        self.policy = policy or SkipPolicy()
        self._counters = _SharedCounters(self.policy.max_listed)

    # --------------------------------------------------------------- pass-through

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return int(self.dataset.num_classes)

    def meta(self, index: int) -> dict:
        meta = getattr(self.dataset, "meta", None)
        return meta(index) if meta is not None else {}

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally; guard against recursion while
        # unpickling (before ``dataset`` is set).
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled for something other than starting a worker (a copy, a cache file):
            # shared-memory objects cannot travel that way, so the copy counts on its own.
            state["_counters"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._counters is None:
            self._counters = _SharedCounters(self.policy.max_listed)

    # --------------------------------------------------------------- reading

    def _source(self, index: int, error: BaseException | None) -> str:
        """The best name for sample ``index``: its path (+ record), else the error's file."""
        try:
            meta = self.meta(index)
        except Exception:  # a corrupt record may fail in meta() too; fall back below
            meta = {}
        path = meta.get("path")
        if path is not None:
            return f"{path} record {meta['record']}" if "record" in meta else str(path)
        for attribute in ("source", "path", "filename"):
            value = getattr(error, attribute, None)
            if value:
                return str(value)
        return f"sample {index}"

    def _read(self, index: int) -> tuple[torch.Tensor, int] | _Bad:
        """``(image, label)`` for a good sample, else why it is bad."""
        self._counters.add(_SEEN)
        try:
            image, label = self.dataset[index]
        except (DataError, OSError) as exc:
            return _Bad(f"{type(exc).__name__}: {exc}", exc)
        label = int(label)
        num_classes = getattr(self.dataset, "num_classes", None)
        if label < 0 or (num_classes is not None and label >= int(num_classes)):
            return _Bad(f"label {label} out of range [0, {num_classes})")
        size = self.policy.image_size
        if size is not None and tuple(image.shape[-2:]) != size:
            found = f"{image.shape[-2]}x{image.shape[-1]}"
            if self.policy.wrong_size == "skip":
                return _Bad(f"image is {found}, expected {size[0]}x{size[1]} (unaligned?)")
            image = _resize(image, size)
            self._counters.add(_RESIZED)
            logger.info("%s: resized %s -> %dx%d", self._source(index, None), found, *size)
        return image, label

    def _bad(self, index: int, bad: _Bad) -> None:
        source = self._source(index, bad.error)
        reason = bad.reason
        if bad.error is not None:
            # Data errors usually start with the file name already: do not repeat it.
            message = str(bad.error)
            if message.startswith(f"{source}: "):
                message = message[len(source) + 2:]
            reason = f"{type(bad.error).__name__}: {message}"
        entry = f"{source}: {reason}"
        count, loud = self._counters.record_bad(entry)
        level = logging.WARNING if loud else logging.DEBUG
        logger.log(level, "bad sample %d skipped (%d so far): %s", index, count, entry)
        if count == WARN_LIMIT + 1:
            logger.warning("more than %d bad samples: further ones are logged at DEBUG level",
                           WARN_LIMIT)
        self.check()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        """``(uint8 (3, H, W), label)``; for a bad sample a counted substitute (``replace``)
        or ``None`` (``skip``). May raise ``TooManyBadSamplesError``."""
        index = int(index)
        if index < 0:
            index += len(self)
        result = self._read(index)
        if not isinstance(result, _Bad):
            return result
        self._bad(index, result)
        if self.policy.on_bad == "skip":
            return None
        length = len(self)
        for attempt in range(self.policy.max_replacement_tries):
            substitute = replacement_index(index, attempt, length)
            result = self._read(substitute)
            if not isinstance(result, _Bad):
                self._counters.add(_REPLACED)
                return result
            self._bad(substitute, result)
        stats = self.stats()
        raise TooManyBadSamplesError(
            f"sample {index} and {self.policy.max_replacement_tries} substitutes are all bad "
            f"({stats.bad} bad of {stats.seen} read); first: {'; '.join(stats.first_bad[:3])}",
            bad=stats.bad, seen=stats.seen, first_bad=stats.first_bad)

    # --------------------------------------------------------------- reporting

    def stats(self) -> BadSampleStats:
        """Counts so far, including reads made in DataLoader worker processes."""
        return self._counters.snapshot()

    def check(self) -> None:
        """Raise ``TooManyBadSamplesError`` when the bad fraction exceeds the policy."""
        stats = self.stats()
        policy = self.policy
        if stats.seen < policy.min_samples or stats.bad_fraction <= policy.max_bad_fraction:
            return
        listing = "\n  ".join(stats.first_bad) or "(none listed)"
        raise TooManyBadSamplesError(
            f"{stats.bad} of {stats.seen} samples read so far are bad "
            f"({100 * stats.bad_fraction:.2f}% > max_bad_fraction "
            f"{100 * policy.max_bad_fraction:.2f}%); fix or remove them, or raise "
            f"max_bad_fraction. First bad files:\n  {listing}",
            bad=stats.bad, seen=stats.seen, first_bad=stats.first_bad)

    def summary(self) -> str:
        """One line for logs: counts and the bad fraction."""
        s = self.stats()
        return (f"{s.seen} samples read, {s.bad} bad ({100 * s.bad_fraction:.2f}%), "
                f"{s.replaced} replaced, {s.resized} resized")


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, *size), bilinear with antialiasing (for downscaling)."""
    x = image.unsqueeze(0).float()
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                        antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


def collate_skipping(batch: list):
    """DataLoader ``collate_fn`` for ``on_bad="skip"``: drops ``None`` samples.

    Returns the default collation of the rest, or ``None`` when every sample was bad (the
    consumer skips that batch).
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)


def require_image_size(dataset, image_size: tuple[int, int]) -> RobustDataset:
    """``dataset`` with images of another size than ``image_size`` treated as bad samples.

    What the trainer applies to every dataset: one wrong-size image in a folder otherwise ended
    in a ``torch.stack`` traceback deep inside batching. Now it is skipped (replaced by a
    counted substitute), logged by file name, and too many stop the run with
    ``TooManyBadSamplesError``. A ``RobustDataset`` keeps its policy, gaining the size check
    when it had none; any other dataset is wrapped with the default policy.
    """
    size = (int(image_size[0]), int(image_size[1]))
    if isinstance(dataset, RobustDataset):
        if dataset.policy.image_size is None:
            dataset.policy = replace(dataset.policy, image_size=size)
        return dataset
    return RobustDataset(dataset, SkipPolicy(image_size=size))


_POLICY_FIELDS = frozenset(f.name for f in fields(SkipPolicy))


@DATASETS.register("robust")
def robust(dataset: str, params: dict | None = None, **policy: Any) -> RobustDataset:
    """Build dataset ``dataset`` (registry name) with ``params`` and wrap it in the policy.

    ``policy`` keys are ``SkipPolicy`` fields (``max_bad_fraction``, ``min_samples``,
    ``on_bad``, ``image_size``, ``wrong_size``, ``max_listed``, ``max_replacement_tries``).
    """
    unknown = sorted(set(policy) - _POLICY_FIELDS)
    if unknown:
        raise TypeError(f"robust: unknown policy key(s) {', '.join(unknown)} (valid: "
                        f"{', '.join(sorted(_POLICY_FIELDS))})")
    if "image_size" in policy and policy["image_size"] is not None:
        policy["image_size"] = tuple(policy["image_size"])
    return RobustDataset(build_dataset(dataset, **(params or {})), SkipPolicy(**policy))
