"""Reliability round 8, evaluation numerics: each test compares a metric with an independent
plain-Python computation (or with itself under a change that must not matter: a gallery's row
order, the probe chunk size) on small inputs. Each failed on the code before its fix.

1. 1:N search scored with a float32 matrix product, whose rounding depends on where an entry
   falls in the BLAS blocking: a mate and an identical non-mate scored 1.0 and 1.0000001, so a
   tie (which counts against the probe) was decided by position and chunk size.
2. ``tpir_at_fpir`` returned a float64 threshold one float64 step above a float32 score, which
   a float32 comparison rounds back onto that score.
3. Allowed counts were ``floor(rate * total + 1e-9)``: one too many just below ``k / total``.
4. The IJB 1:N summary was NaN when one gallery could not measure an FPIR.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualiface.eval import EvaluationError
from qualiface.eval.identification import search, tpir_at_fpir
from qualiface.eval.quality import edc, edc_refixed
from qualiface.eval.verification import roc_curve, tar_at_far
from qualiface.scoring.identification import SearchResult
from qualiface.scoring.thresholds import count_within, threshold_at_fmr

F32 = np.float32


def up32(value: float) -> float:
    """The next float32 above ``value`` (a float32 value), as a Python float."""
    return float(np.nextafter(F32(value), F32(np.inf)))


def allowed_by_hand(rate: float, total: int) -> int:
    """The most of ``total`` items a rate allows: largest k with k / total <= rate, by a loop."""
    return max(k for k in range(total + 1) if k / total <= rate) if total else 0


# ------------------------------------------------------- 1. identification ties by position


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def tree_score(probe: np.ndarray, entry: np.ndarray) -> np.float32:
    """The documented score: the float64 products of the float32 values (exact), zero-padded to
    a power of two and summed pairwise, (p0 + p1) + (p2 + p3) and so on up, rounded to float32
    once."""
    level = [a * b for a, b in zip(probe.tolist(), entry.tolist())]
    while len(level) & (len(level) - 1):
        level.append(0.0)
    while len(level) > 1:
        level = [level[i] + level[i + 1] for i in range(0, len(level), 2)]
    return F32(level[0])


def gallery_layouts(rng, probes: np.ndarray, fillers: np.ndarray):
    """Galleries holding, for each probe i, its mate (subject i, a copy of the probe: a
    self-match scoring 1) and an identical non-mate (subject 100 + i), at several positions
    among random fillers (subjects 1000+) -> (features, subjects) per layout."""
    num = len(probes)
    mates = [(probes[i], i) for i in range(num)]
    copies = [(probes[i], 100 + i) for i in range(num)]
    others = [(row, 1000 + j) for j, row in enumerate(fillers)]
    orders = [mates + others + copies, copies + others + mates,
              others + mates + copies, copies + mates + others,
              [x for pair in zip(copies, mates) for x in pair] + others]
    for _ in range(3):
        entries = mates + copies + others
        orders.append([entries[k] for k in rng.permutation(len(entries))])
    for order in orders:
        yield (np.stack([row for row, _ in order]), np.array([s for _, s in order]))


@pytest.mark.parametrize("num_fillers", [27, 77])
def test_a_mate_and_an_identical_non_mate_tie_wherever_they_stand_and_whatever_the_chunk(
        num_fillers):
    # Before: a float32 matmul per chunk. With a one-probe chunk (matrix-vector) or at an edge
    # tile the self-match scored 1.0000001 at one position and 1.0 at another, so the probe
    # was rank 1 or rank 2 depending on where its mate and the identical non-mate stood.
    rng = np.random.default_rng(num_fillers)
    probes = unit_rows(rng, 5, 512)
    fillers = unit_rows(rng, num_fillers, 512)
    subjects = np.arange(len(probes))
    expected_mated = [tree_score(p, p) for p in probes]
    tops = set()
    for gallery, gallery_subjects in gallery_layouts(rng, probes, fillers):
        for chunk in (1, 2, 3, 512):
            result = search(probes, subjects, gallery, gallery_subjects, chunk=chunk)
            # The identical non-mate ties with the mate: the tie counts against the probe.
            assert result.ranks.tolist() == [2] * len(probes), (chunk, gallery_subjects)
            assert result.mated_scores.tolist() == expected_mated
            tops.add(tuple(result.top_scores.tolist()))
    assert tops == {tuple(expected_mated)}


def test_search_results_do_not_depend_on_gallery_order_or_chunk_and_match_a_plain_loop():
    # Every score is the documented tree sum, so permuting the gallery (with its
    # labels) or changing the chunk changes nothing, bit for bit; before, the mated and top
    # scores moved by a float32 step with the chunk.
    rng = np.random.default_rng(8)
    dim = 64
    base = unit_rows(rng, 12, dim)
    gallery = np.concatenate([base, base[:6]])  # every one of the first six twice
    gallery_subjects = np.concatenate([np.arange(12), np.arange(6) + 50])
    probes = np.concatenate([base[:8], unit_rows(rng, 5, dim)])
    probe_subjects = np.concatenate([np.arange(8), [3, 7, 60, 61, 62]])
    reference = search(probes, probe_subjects, gallery, gallery_subjects)
    # Independent: plain loops over the documented score and the documented rank rule.
    for i, probe in enumerate(probes):
        scores = [tree_score(probe, row) for row in gallery]
        is_mate = gallery_subjects == probe_subjects[i]
        assert reference.top_scores[i] == max(scores)
        if not is_mate.any():
            assert reference.ranks[i] == 0
            continue
        best = max(s for s, m in zip(scores, is_mate) if m)
        assert reference.mated_scores[i] == best
        assert reference.ranks[i] == 1 + sum(s >= best for s, m in zip(scores, is_mate) if not m)
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(len(gallery))
        for chunk in (1, 3, 5, 512):
            result = search(probes, probe_subjects, gallery[order], gallery_subjects[order],
                            chunk=chunk)
            np.testing.assert_array_equal(result.ranks, reference.ranks)
            np.testing.assert_array_equal(result.mated_scores, reference.mated_scores)
            np.testing.assert_array_equal(result.top_scores, reference.top_scores)


def test_a_score_on_a_float32_rounding_boundary_is_taken_from_the_documented_sum(monkeypatch):
    # p . g1 = 1 + 2**-24 exactly: halfway between the float32 values 1 and 1 + 2**-23, where a
    # last-bit difference in the float64 product could round either way. Such entries are
    # summed by the fixed tree (rounding half to even: 1.0), so g1 ties with g2 (exactly 1.0).
    from qualiface.scoring import similarity

    calls = []
    tree_dots = similarity._tree_dots

    def spy(*args):
        calls.append(len(args[2]))
        return tree_dots(*args)

    monkeypatch.setattr(similarity, "_tree_dots", spy)
    probe = np.array([[1.0, 2.0 ** -24, 0.0, 0.0, 0.0]], dtype=np.float32)
    gallery = np.array([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    for order in ([0, 1], [1, 0]):
        result = search(probe, [7], gallery[order], np.array([7, 8])[order])
        assert result.mated_scores.tolist() == [tree_score(probe[0], gallery[0])] == [1.0]
        assert result.ranks.tolist() == [2]  # a float32 tie with the non-mate
    assert calls and all(n >= 1 for n in calls)


@pytest.mark.parametrize("dim", [1, 2, 37, 64])
def test_the_rescoring_sum_is_the_documented_tree_for_any_width(dim):
    import torch

    from qualiface.scoring.similarity import _tree_dots

    rng = np.random.default_rng(dim)
    left, right = unit_rows(rng, 6, dim), unit_rows(rng, 9, dim)
    rows = torch.tensor([0, 5, 3, 3, 1])
    cols = torch.tensor([8, 0, 2, 2, 7])
    got = _tree_dots(torch.from_numpy(left).double(), torch.from_numpy(right).double(), rows,
                     cols)
    assert got.tolist() == [tree_score(left[r], right[c]) for r, c in zip(rows.tolist(),
                                                                          cols.tolist())]


# ------------------------------------------------ 2. TPIR threshold in the scores' precision


def test_tpir_threshold_holds_for_float32_scores_tied_with_the_cut_non_mated_score():
    # 10 non-mated probes; FPIR 0.1 allows one (0.6), so 0.5 must be rejected. The threshold
    # was 0.5000000000000001 (float64), which a float32 comparison rounds onto 0.5: applied
    # to the float32 scores it gave FPIR 0.2 and accepted the mated 0.5 (TPIR 1.0, not 2/3).
    half = F32(0.5)
    above = np.nextafter(half, F32(1))
    nonmated_top = np.array([0.6, 0.5] + [0.1] * 8, dtype=np.float32)
    mated = np.array([half, above, 0.7], dtype=np.float32)
    result = SearchResult(np.r_[[1, 1, 1], np.zeros(10, dtype=np.int64)],
                          np.r_[mated, np.full(10, -np.inf, dtype=np.float32)],
                          np.r_[mated, nonmated_top])
    tpir, threshold = tpir_at_fpir(result, [0.1])[0.1]
    assert threshold == float(above)  # a float32 value: the same in either precision
    assert tpir == pytest.approx(2 / 3)
    for scores in (nonmated_top, nonmated_top.astype(np.float64)):
        assert np.mean(scores >= threshold) == pytest.approx(0.1)
    for scores in (mated, mated.astype(np.float64)):
        assert np.mean(scores >= threshold) == pytest.approx(tpir)


# ------------------------------------------- 3. allowed counts by an exact rule, no 1e-9 fudge


@st.composite
def rate_and_total(draw, max_total: int = 12):
    total = draw(st.integers(1, max_total))
    k = draw(st.integers(1, total))
    exact = k / total
    rate = draw(st.one_of(
        st.just(exact),
        st.just(float(np.nextafter(exact, 0.0))),  # a hair below k / total: k is too many
        st.just(float(np.nextafter(exact, 1.0))),
        st.floats(1e-6, 1.0, exclude_max=True),
        st.sampled_from([0.1, 0.25, 0.29, 1 / 3, 0.5, 0.7])))
    return rate, total


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rate_and_total(max_total=200))
def test_count_within_is_the_largest_count_whose_rate_is_within_the_target(case):
    rate, total = case
    assert count_within(rate, total) == allowed_by_hand(rate, total)


#: float32 values (as Python floats), with adjacent pairs, so ties and one-step gaps occur.
SCORE_POOL = [float(F32(v)) for v in (0.1, 0.25, 0.5, up32(0.5), 0.6, 0.7, up32(0.7), 0.9)]


def draw_pair_set(data, max_genuine: int, plain_rates: list[float]):
    """(impostor, genuine) score lists from SCORE_POOL and a target rate: k / n, the floats
    either side of it, or one of ``plain_rates``."""
    impostor = data.draw(st.lists(st.sampled_from(SCORE_POOL), min_size=1, max_size=12))
    genuine = data.draw(st.lists(st.sampled_from(SCORE_POOL), min_size=1, max_size=max_genuine))
    n = len(impostor)
    k = data.draw(st.integers(1, n))
    near = [k / n, float(np.nextafter(k / n, 0.0)), float(np.nextafter(k / n, 1.0))]
    return impostor, genuine, st.sampled_from(near + plain_rates)


def brute_threshold(impostor: list[float], fmr: float) -> float | None:
    """Lowest float32 threshold (a score or the next float32 above one) whose FMR
    (false matches / impostors, compared exactly) is at most ``fmr``; None if none allows a
    false match (not measurable)."""
    n = len(impostor)
    if not any(k / n <= fmr for k in range(1, n + 1)):
        return None
    candidates = sorted({c for s in impostor for c in (s, up32(s))})
    return min(t for t in candidates if sum(s >= t for s in impostor) / n <= fmr)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_threshold_at_fmr_against_brute_force_with_targets_next_to_k_over_n(data):
    # fmr = nextafter(3 / 10, 0) = 0.29999999999999993 over 10 impostors allowed 3 false
    # matches (FMR 0.3), and 0.9999999999999999 allowed all 10 (FMR 1.0).
    impostor, genuine, rates = draw_pair_set(data, 3, [0.1, 0.29, 0.5])
    fmr = data.draw(st.one_of(rates, st.floats(1e-3, 1.0, exclude_max=True)))
    if fmr >= 1:  # FMR must lie below 1: the float just below it instead
        fmr = float(np.nextafter(1.0, 0.0))
    scores = np.array(genuine + impostor, dtype=np.float32)
    labels = np.array([True] * len(genuine) + [False] * len(impostor))
    want = brute_threshold(impostor, fmr)
    if want is None:
        with pytest.raises(EvaluationError, match="not measurable"):
            threshold_at_fmr(scores, labels, fmr)
        return
    got = threshold_at_fmr(scores, labels, fmr)
    assert got == want
    # And it holds as the float32 comparison the callers make.
    assert np.sum(scores[~labels] >= got) / len(impostor) <= fmr


def test_threshold_at_fmr_just_below_one_does_not_accept_every_impostor():
    impostor = np.linspace(0.1, 0.9, 10).astype(np.float32)
    scores = np.r_[F32(0.95), impostor]
    labels = np.r_[True, np.zeros(10, dtype=bool)]
    fmr = float(np.nextafter(1.0, 0.0))  # 0.9999999999999999
    threshold = threshold_at_fmr(scores, labels, fmr)
    assert np.sum(impostor >= threshold) == 9  # before: 10 of 10, an FMR of 1.0 > fmr


def brute_tar(genuine: list[float], impostor: list[float], far: float):
    """(best TAR with FAR <= far, highest threshold reaching it) over every threshold a score
    set has, or None when no false accept is allowed."""
    n = len(impostor)
    if not any(k / n <= far for k in range(1, n + 1)):
        return None
    candidates = sorted({c for s in genuine + impostor for c in (s, up32(s))} | {math.inf})
    ok = [t for t in candidates if sum(s >= t for s in impostor) / n <= far]
    best = max(sum(s >= t for s in genuine) for t in ok)
    return best / len(genuine), max(t for t in ok if sum(s >= t for s in genuine) == best)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_tar_at_far_against_brute_force_with_targets_next_to_k_over_n(data):
    impostor, genuine, rates = draw_pair_set(data, 5, [0.1, 0.5])
    n = len(impostor)
    far = data.draw(rates)
    if far > 1:
        far = 1.0
    scores = np.array(genuine + impostor, dtype=np.float32)
    labels = np.array([True] * len(genuine) + [False] * n)
    tar, threshold = tar_at_far(roc_curve(scores, labels), [far])[far]
    want = brute_tar(genuine, impostor, far)
    if want is None:
        assert math.isnan(tar) and math.isnan(threshold)
    else:
        assert (tar, threshold) == (pytest.approx(want[0]), want[1])


def brute_tpir(result: SearchResult, fpir: float):
    """(TPIR, threshold) by trying every threshold: the lowest whose FPIR (non-mated top
    scores >= it / non-mated probes) is within ``fpir``; None when not measurable."""
    mated = result.ranks > 0
    nonmated = [float(s) for s in result.top_scores[~mated]]
    n = len(nonmated)
    if not any(k / n <= fpir for k in range(1, n + 1)):
        return None
    candidates = sorted({c for s in nonmated for c in (s, up32(s))} | {-math.inf})
    threshold = min(t for t in candidates if sum(s >= t for s in nonmated) / n <= fpir)
    hits = [r == 1 and float(s) >= threshold
            for r, s in zip(result.ranks[mated], result.mated_scores[mated])]
    return sum(hits) / len(hits), threshold


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_tpir_at_fpir_against_brute_force_with_targets_next_to_k_over_n(data):
    num_mated = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 12))
    mated_scores = data.draw(st.lists(st.sampled_from(SCORE_POOL), min_size=num_mated,
                                      max_size=num_mated))
    ranks = data.draw(st.lists(st.sampled_from([1, 1, 2]), min_size=num_mated,
                               max_size=num_mated))
    nonmated_top = data.draw(st.lists(st.sampled_from(SCORE_POOL), min_size=n, max_size=n))
    k = data.draw(st.integers(1, n))
    fpir = data.draw(st.sampled_from([k / n, float(np.nextafter(k / n, 0.0)),
                                      float(np.nextafter(k / n, 1.0)), 0.1, 0.5]))
    fpir = min(fpir, 1.0)
    result = SearchResult(np.array(ranks + [0] * n),
                          np.array(mated_scores + [-np.inf] * n, dtype=np.float32),
                          np.array(mated_scores + nonmated_top, dtype=np.float32))
    tpir, threshold = tpir_at_fpir(result, [fpir])[fpir]
    want = brute_tpir(result, fpir)
    if want is None:
        assert math.isnan(tpir) and math.isnan(threshold)
    else:
        assert (tpir, threshold) == (pytest.approx(want[0]), want[1])


def test_refixed_edc_snaps_a_fraction_just_below_k_over_n_down_not_up():
    # 6 comparisons of distinct quality: realisable discards k/6. A requested
    # 0.49999999999999994 is below 3/6 and must snap down to 2/6; the 1e-9 tolerance gave 3/6.
    scores = np.array([0.9, 0.2, 0.8, 0.1, 0.3, 0.7], dtype=np.float32)
    labels = np.array([True, False, True, False, False, True])
    quality = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    below_half = float(np.nextafter(0.5, 0.0))
    curve = edc_refixed(scores, labels, quality, fmr=0.5, fractions=[below_half])
    assert curve.discard_fractions.tolist() == [0.0, 2 / 6]
    assert max(curve.discard_fractions) <= below_half


def test_edc_with_a_given_threshold_compares_float32_scores_exactly():
    # Another float64-threshold-vs-float32-score comparison: NumPy rounded a given threshold
    # of 0.7 to float32(0.7) = 0.699999988, so a mated score of 0.699999988 (< 0.7) counted
    # as a match: FNMR 0 where the truth is 1/2.
    scores = np.array([F32(0.7), 0.9, 0.1, 0.2], dtype=np.float32)
    labels = np.array([True, True, False, False])
    quality = np.array([0.5, 0.6, 0.5, 0.6])
    assert float(scores[0]) < 0.7
    assert edc(scores, labels, quality, threshold=0.7).errors[0] == 0.5
    # A threshold that is a float32 value compares the same way in either precision.
    assert edc(scores, labels, quality, threshold=float(scores[0])).errors[0] == 0.0


# ---------------------------------------------------- 4. IJB TPIR summary over galleries


def test_ijb_tpir_summary_reports_the_measurable_gallery_and_names_the_other(tmp_path):
    # G1 holds 20 subjects (10 non-mated probes), G2 10 (20 non-mated probes): FPIR 0.05 is
    # measurable on G2 only. The summary was NaN; now it is G2's value, and says G1 could not.
    from test_ijb import write_ijb_fixture

    from qualiface.data.ijb import load_ijb
    from qualiface.eval.ijb import IJBOptions, evaluate_ijb

    _, features = write_ijb_fixture(tmp_path)
    meta = tmp_path / "IJBC" / "meta"
    rows = {}
    for label in ("G1", "G2"):
        lines = (meta / f"ijbc_1N_gallery_{label}.csv").read_text().splitlines()
        rows[label] = lines[1:]
    everyone = rows["G1"] + rows["G2"]
    for label, members in (("G1", everyone[:20]), ("G2", everyone[20:])):
        (meta / f"ijbc_1N_gallery_{label}.csv").write_text(
            "TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(members) + "\n")
    protocol = load_ijb(tmp_path, "IJBC")
    result = evaluate_ijb(protocol, features, IJBOptions(fars=(1e-1,), fpirs=(0.05, 0.1),
                                                         edc_fmrs=()))
    ident = result.metrics["identification"]
    g1, g2 = ident["galleries"]["G1"], ident["galleries"]["G2"]
    assert (g1["num_nonmated_probes"], g2["num_nonmated_probes"]) == (10, 20)
    assert math.isnan(g1["tpir_at_fpir"]["5e-02"]) and not math.isnan(g2["tpir_at_fpir"]["5e-02"])
    assert ident["tpir_at_fpir"]["5e-02"] == g2["tpir_at_fpir"]["5e-02"]
    assert ident["tpir_at_fpir"]["1e-01"] == pytest.approx(
        (g1["tpir_at_fpir"]["1e-01"] + g2["tpir_at_fpir"]["1e-01"]) / 2)
    assert ident["tpir_not_measurable"] == {"5e-02": ["G1"]}
    assert "G1 (10 non-mated probes)" in ident["tpir_note"]
    assert "mean over G2 only" in ident["tpir_note"]


def test_ijb_tpir_summary_is_nan_with_a_note_only_when_no_gallery_measures_it():
    from qualiface.eval.ijb import _tpir_summary

    per_gallery = {"G1": {"num_nonmated_probes": 10, "tpir_at_fpir": {"1e-02": math.nan}},
                   "G2": {"num_nonmated_probes": 0}}  # no non-mated probe: no TPIR entry
    summary = _tpir_summary(per_gallery, [1e-2])
    assert math.isnan(summary["tpir_at_fpir"]["1e-02"])
    assert summary["tpir_not_measurable"] == {"1e-02": ["G1", "G2"]}
    assert "not measurable on any gallery" in summary["tpir_note"]
    both = {"G1": {"num_nonmated_probes": 200, "tpir_at_fpir": {"1e-02": 0.5}},
            "G2": {"num_nonmated_probes": 300, "tpir_at_fpir": {"1e-02": 0.7}}}
    assert _tpir_summary(both, [1e-2]) == {"tpir_at_fpir": {"1e-02": pytest.approx(0.6)}}
