"""LFW pairs parsing: the real protocol, header variants, malformed files, fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qualiface.data.decode import DataError
from qualiface.data.lfw import (
    MissingImagesError,
    PairsFormatError,
    lfw_image_path,
    parse_pairs_text,
    read_pairs,
)


def _view2(folds: int, per_side: int) -> str:
    lines = [f"{folds}\t{per_side}"]
    for fold in range(folds):
        lines += [f"P{fold}_{k}\t1\t2" for k in range(per_side)]
        lines += [f"P{fold}_{k}\t1\tQ{fold}_{k}\t3" for k in range(per_side)]
    return "\n".join(lines) + "\n"


def test_view2_layout_gives_folds_and_paths():
    pairs = parse_pairs_text(_view2(3, 2), source="p.txt")
    assert len(pairs) == 12 and pairs.folds == [1, 2, 3]
    assert pairs.fold.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert pairs.issame.tolist() == [True, True, False, False] * 3
    assert pairs.paths1[0] == "P0_0/P0_0_0001.jpg" and pairs.paths2[0] == "P0_0/P0_0_0002.jpg"
    assert pairs.paths2[2] == "Q0_0/Q0_0_0003.jpg"
    selected = pairs.select_folds(2, 3)
    assert len(selected) == 8 and selected.fold.tolist() == [2] * 4 + [3] * 4
    assert selected.paths1[0] == "P1_0/P1_0_0001.jpg"
    with pytest.raises(ValueError, match="no fold"):
        pairs.select_folds(4)


def test_unique_images_index_back_to_every_pair():
    pairs = parse_pairs_text("a 1 2\na 1 b 1\nb 1 c 7\n")
    images, index1, index2 = pairs.unique_images()
    assert images == ["a/a_0001.jpg", "a/a_0002.jpg", "b/b_0001.jpg", "c/c_0007.jpg"]
    assert [images[i] for i in index1] == list(pairs.paths1)
    assert [images[i] for i in index2] == list(pairs.paths2)


def test_headerless_and_view1_files():
    headerless = parse_pairs_text("a 1 2\nb 3 c 4\n")
    assert headerless.issame.tolist() == [True, False] and headerless.folds == [1]
    view1 = parse_pairs_text("2\na 1 2\nb 1 2\na 1 b 1\nc 1 d 2\n")
    assert view1.issame.tolist() == [True, True, False, False] and view1.folds == [1]
    assert lfw_image_path("George_W_Bush", 12) == "George_W_Bush/George_W_Bush_0012.jpg"


@pytest.mark.parametrize("text, line, message", [
    ("1 2\na 1 2\na 1 b 2\na 1 2\n", 1, "header says 1 fold"),
    ("1 1\na 1 b 2\na 1 2\n", 2, "expects a matched"),
    ("1 2\na 1 2\na 1 b 2\na 1 b 2\na 1 b 2\n", 3, "expects a matched"),
    ("1 2\na 1 2\na 1 2\na 1 b 2\na 1 2\n", 5, "expects a mismatched"),
    ("a 1 2\na 1 2 3 4\n", 2, "got 5 fields"),
    ("a 1 2\na x 2\n", 2, "not a positive integer"),
    ("a 1 2\na 0 2\n", 2, "must be >= 1"),
    ("../etc 1 2\n", 1, "not a valid person name"),
    ("10 x\n", 1, "header value"),
    ("3 2\n", None, "header but no pairs"),
    ("\n\n", None, "empty file"),
])
def test_malformed_files_fail_with_the_line_number(text, line, message):
    with pytest.raises(PairsFormatError, match=message) as info:
        parse_pairs_text(text, source="pairs.txt")
    if line is not None:
        assert f"pairs.txt:{line}:" in str(info.value)


@pytest.mark.parametrize("text, line, message", [
    ("a 1 1\n", 1, "with itself"),  # once read as a genuine pair of one image (score 1)
    ("a 1 2\nb 1 b 2\n", 2, "names 'b' twice"),  # once an impostor pair of one person
    ("a 1 2\nb 1 c 2\na 1 2\n", 3, "same pair as line 1"),
    ("a 1 2\nb 1 c 2\nc 2 b 1\n", 3, "same pair as line 2"),  # either order
    ("1 1\na 1 2\na 1 2\n", 3, "expects a mismatched"),  # the layout error comes first
])
def test_pairs_no_protocol_holds_are_refused(tmp_path, text, line, message):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(PairsFormatError, match=message) as info:
        read_pairs(path)
    if line is not None:
        assert f"{path}:{line}:" in str(info.value)


def test_missing_images_are_all_reported(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "a_0001.jpg").write_bytes(b"x")
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("a 1 2\na 1 b 1\n")
    with pytest.raises(MissingImagesError) as info:
        read_pairs(pairs_file, tmp_path)
    assert info.value.missing == ["a/a_0002.jpg", "b/b_0001.jpg"]
    assert "2 of 3 images" in str(info.value)
    with pytest.raises(PairsFormatError, match="not found"):
        read_pairs(tmp_path / "none.txt")
    pairs_file.write_bytes(b"a 1 2\n\xff\xfe\n")
    with pytest.raises(PairsFormatError, match="not UTF-8"):
        read_pairs(pairs_file)


def test_official_lfw_pairs(shared_data):
    lfw = shared_data / "lfw"
    pairs = read_pairs(lfw / "pairs.txt", lfw / "aligned112")  # raises if any image is missing
    assert len(pairs) == 6000 and pairs.folds == list(range(1, 11))
    for fold in range(1, 11):
        in_fold = pairs.fold == fold
        assert in_fold.sum() == 600
        assert pairs.issame[in_fold].sum() == 300
    assert np.array_equal(np.flatnonzero(pairs.fold == 8)[[0, -1]], [4200, 4799])
    images, index1, index2 = pairs.unique_images()
    assert len(set(images)) == len(images) and max(index1.max(), index2.max()) < len(images)
    assert len(pairs.select_folds(8, 9, 10)) == 1800


@settings(max_examples=300, deadline=1000, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list("ab_ 0123456789\t\n-x./")), max_size=200)
       | st.text(max_size=200))
def test_fuzz_pairs_parser_gives_only_clean_errors(text):
    try:
        pairs = parse_pairs_text(text, source="fuzz")
    except PairsFormatError as exc:
        assert "fuzz" in str(exc)
        assert isinstance(exc, DataError)
        return
    assert len(pairs.paths1) == len(pairs.paths2) == len(pairs.issame) == len(pairs.fold) > 0
