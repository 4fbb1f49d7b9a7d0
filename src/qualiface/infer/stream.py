"""Streaming (video) aggregation: per-track templates updated frame by frame.

:class:`StreamAggregator` keeps one EQFace progressive template per track id
(``qualiface.scoring.aggregation.ProgressiveTemplate``): a frame updates its track's template only
when its quality exceeds ``s_th`` and it agrees with the template (cosine > ``f_th``); the
template is the quality-weighted mean of the accepted frames. Templates are available at any
time, so a tracker can query the gallery while the video plays.

For whole videos known in advance, :func:`aggregate_tracks` pools all frames of each track at
once with the batch forms (QWFA, QWFA with filter, plain mean) of
``qualiface.scoring.aggregation.aggregate_templates``; ``mode="progressive"`` replays the frames
through a :class:`StreamAggregator` so both paths share one output format.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from qualiface.scoring.aggregation import ProgressiveTemplate, aggregate_templates, pooling_weights

STREAM_MODES = ("progressive", "qwfa", "qwfaf", "mean")
#: Frames fed between two progress-bar updates in ``aggregate_tracks``'s progressive replay.
FEED_CHUNK = 4096


@dataclass
class TrackTemplate:
    """The current template of one track.

    embedding: (D,) float32 L2-normalised template; quality: sum of accepted frame qualities;
    frames_seen / frames_used: frames offered / accepted.
    """

    track_id: Hashable
    embedding: np.ndarray
    quality: float
    frames_seen: int
    frames_used: int


class StreamAggregator:
    """Per-track EQFace progressive templates fed one frame at a time.

    ``feature_threshold`` (f_th, cosine) and ``quality_threshold`` (s_th, raw quality) are the
    EQFace acceptance thresholds; their defaults accept every frame with positive quality.
    """

    def __init__(self, feature_threshold: float = -1.0, quality_threshold: float = 0.0) -> None:
        self.feature_threshold = feature_threshold
        self.quality_threshold = quality_threshold
        self._tracks: dict[Hashable, ProgressiveTemplate] = {}
        self._seen: dict[Hashable, int] = {}

    def feed(self, track_id: Hashable, embedding, quality: float) -> bool:
        """Offer one frame: embedding (D,) raw or normalised, raw quality. Returns accepted."""
        template = self._tracks.get(track_id)
        if template is None:
            template = self._tracks[track_id] = ProgressiveTemplate(self.feature_threshold, self.quality_threshold)
        self._seen[track_id] = self._seen.get(track_id, 0) + 1
        return template.update(embedding, quality)

    def feed_many(self, track_ids, embeddings, qualities) -> np.ndarray:
        """Feed frames in order: track_ids (N,), embeddings (N, D), qualities (N,) -> accepted (N,)."""
        embeddings = np.asarray(embeddings)
        qualities = np.asarray(qualities, dtype=np.float64)
        if len(track_ids) != len(embeddings) or len(embeddings) != len(qualities):
            raise ValueError(
                f"{len(track_ids)} track ids, {len(embeddings)} embeddings and {len(qualities)} qualities"
            )
        return np.array([self.feed(t, e, q) for t, e, q in zip(track_ids, embeddings, qualities)], dtype=bool)

    def template(self, track_id: Hashable) -> TrackTemplate | None:
        """The track's current template, or None if it has no accepted frame yet (or is unknown)."""
        state = self._tracks.get(track_id)
        if state is None or state.embedding is None:
            return None
        return TrackTemplate(
            track_id, state.embedding.astype(np.float32), float(state.quality_sum), self._seen[track_id], state.count
        )

    def templates(self) -> list[TrackTemplate]:
        """Current templates of every track with at least one accepted frame (first-seen order)."""
        return [t for t in (self.template(track) for track in self._tracks) if t is not None]

    def tracks_without_template(self) -> list[Hashable]:
        """Tracks seen but with no accepted frame (every frame below s_th or degenerate)."""
        return [track for track, state in self._tracks.items() if state.embedding is None]

    def drop(self, track_id: Hashable) -> TrackTemplate | None:
        """End a track (e.g. it left the scene): returns its final template and forgets it."""
        final = self.template(track_id)
        self._tracks.pop(track_id, None)
        self._seen.pop(track_id, None)
        return final


def aggregate_tracks(
    track_ids,
    embeddings,
    qualities,
    *,
    mode: str = "progressive",
    feature_threshold: float = -1.0,
    quality_threshold: float = 0.0,
    progress: bool = False,
) -> list[TrackTemplate]:
    """Whole-video templates: frames (N,) track ids, (N, D) embeddings, (N,) raw qualities.

    ``progressive`` replays frames in the given order through :class:`StreamAggregator`
    (uses both thresholds); ``qwfa`` = quality-weighted mean; ``qwfaf`` = QWFA over frames with
    quality >= ``quality_threshold`` when the track's mean quality reaches it, else the plain
    mean; ``mean`` ignores quality. Batch modes return tracks sorted by id; their ``quality``
    is the sum of the qualities of the frames they pooled. ``progress``: a bar over the frames
    replayed by ``progressive`` (a Python loop, ~40 us a frame; the batch modes are one pass).
    """
    if mode not in STREAM_MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(STREAM_MODES)}")
    track_ids = np.asarray(track_ids)
    qualities = np.asarray(qualities, dtype=np.float64)
    # Checked as the float32 values every mode pools: a value finite in float64 but beyond
    # float32's range (1e39) becomes inf there and would come out as a NaN template.
    with np.errstate(over="ignore"):
        embeddings = np.asarray(embeddings, dtype=np.float32)
    _check_frames(track_ids, embeddings.astype(np.float64), qualities)
    if mode == "progressive":
        from qualiface.progress import make_progress  # lazy: rich only for this loop

        aggregator = StreamAggregator(feature_threshold, quality_threshold)
        tracks = track_ids.tolist()  # lengths checked by _check_frames: fed in pieces below
        with make_progress(enabled=progress, unit="frame") as bar:
            task = bar.add_task("aggregating", total=len(tracks))
            for start in range(0, len(tracks), FEED_CHUNK):
                piece = slice(start, start + FEED_CHUNK)
                piece_ids = tracks[piece]
                aggregator.feed_many(piece_ids, embeddings[piece], qualities[piece])
                bar.advance(task, len(piece_ids))
        return aggregator.templates()
    pooled = aggregate_templates(
        embeddings, track_ids, quality=qualities, mode=mode,
        quality_threshold=quality_threshold if mode == "qwfaf" else None,
    )
    _, row, frame_counts = np.unique(track_ids, return_inverse=True, return_counts=True)  # same order as pooled.ids
    row = row.ravel()
    # The frames the batch form pooled are those it gave a weight: a frame of quality 0 adds
    # nothing to QWFA (unless every frame of its track has 0 and the plain mean takes over).
    _, _, weight = pooling_weights(
        track_ids, norms=np.ones(len(track_ids)), quality=qualities, mode=mode,
        quality_threshold=quality_threshold if mode == "qwfaf" else None,
    )
    used = weight > 0
    quality_sums = np.bincount(row, weights=qualities * used, minlength=len(frame_counts))
    used_counts = np.bincount(row, weights=used, minlength=len(frame_counts)).astype(int)
    return [
        TrackTemplate(
            track.item() if hasattr(track, "item") else track, pooled.features[index].astype(np.float32),
            float(quality_sums[index]), int(frame_counts[index]), int(used_counts[index]),
        )
        for index, track in enumerate(pooled.ids)
    ]


class FrameError(ValueError):
    """A frame that no template may pool (non-finite quality, zero or non-finite embedding)."""


def _check_frames(track_ids: np.ndarray, embeddings: np.ndarray, qualities: np.ndarray) -> None:
    """One rule for every mode, naming the first bad frame (its row): progressive used to skip
    a NaN quality silently and stop on a zero embedding without saying which, where the batch
    modes refused both."""
    if len(track_ids) != len(embeddings):
        raise FrameError(f"{len(track_ids)} track ids, {len(embeddings)} embeddings and "
                         f"{len(qualities)} qualities")
    if embeddings.ndim != 2 or qualities.shape != (len(embeddings),):
        raise FrameError(f"expected (N, D) embeddings and (N,) qualities, got {embeddings.shape} "
                         f"and {qualities.shape}")
    bad_quality = np.flatnonzero(~np.isfinite(qualities))
    if len(bad_quality):
        raise FrameError(f"frame {bad_quality[0]}: quality {qualities[bad_quality[0]]} is not a finite number "
                         f"({len(bad_quality)} such frame(s))")
    norms = np.linalg.norm(embeddings, axis=1)
    bad_embedding = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad_embedding):
        raise FrameError(f"frame {bad_embedding[0]}: embedding is zero or not finite "
                         f"({len(bad_embedding)} such frame(s))")
