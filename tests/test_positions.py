"""The position-ID policy: `sequence_position_ids`, `visual_position_ids`, `validate_kept`, `PositionPolicy`."""

from __future__ import annotations

import pytest
import torch

import mllm
from mllm.errors import KeepSetError
from mllm.positions import PositionPolicy, next_position_id, sequence_position_ids, validate_kept, visual_position_ids


@pytest.mark.parametrize("policy", ["reassign", "keep", "shift", "permute:fraction=0"])
def test_all_kept_in_raster_order_is_arange(policy):
    ids = sequence_position_ids(torch.arange(9), prefix_len=4, num_visual=9, suffix_len=5, policy=policy)
    assert ids.dtype == torch.long
    assert ids.tolist() == list(range(4 + 9 + 5))


def test_hand_computed_example():
    kept = torch.tensor([4, 1, 5])
    reassign = sequence_position_ids(kept, 3, 6, 2, "reassign")
    keep = sequence_position_ids(kept, 3, 6, 2, "keep")
    assert reassign.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert keep.tolist() == [0, 1, 2, 7, 4, 8, 9, 10]
    assert next_position_id(reassign) == 8
    assert next_position_id(keep) == 11
    assert visual_position_ids(kept, 3, 6, "keep").tolist() == [7, 4, 8]
    assert visual_position_ids(kept, 3, 6, "reassign").tolist() == [3, 4, 5]


def _split(ids: torch.Tensor, prefix: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text IDs, visual IDs) of `prefix | count visual | suffix`."""
    return torch.cat([ids[:prefix], ids[prefix + count:]]), ids[prefix:prefix + count]


PREFIX, N, SUFFIX = 5, 64, 7
KEPT = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:48]


def test_permute_full_is_a_permutation_of_keep_ids():
    keep_text, keep_visual = _split(sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "keep"), PREFIX, len(KEPT))
    ids = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, PositionPolicy("permute", fraction=1.0, seed=0))
    text, visual = _split(ids, PREFIX, len(KEPT))
    assert torch.equal(text, keep_text)
    assert sorted(visual.tolist()) == sorted(keep_visual.tolist())
    assert not torch.equal(visual, keep_visual)


def test_permute_fraction_zero_equals_keep():
    keep = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "keep")
    assert torch.equal(sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "permute:fraction=0,seed=5"), keep)


def test_permute_partial_fraction_moves_at_most_that_share():
    keep = visual_position_ids(KEPT, PREFIX, N, "keep")
    ids = visual_position_ids(KEPT, PREFIX, N, "permute:fraction=0.25,seed=2")
    moved = int((ids != keep).sum())
    assert 0 < moved <= round(0.25 * len(KEPT))
    assert sorted(ids.tolist()) == sorted(keep.tolist())


def test_permute_seed_is_deterministic():
    first = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "permute:seed=3")
    again = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "permute:seed=3")
    other = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "permute:seed=4")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("window", [1, 5, 8])
def test_permute_window_keeps_ids_within_window(window):
    keep = visual_position_ids(KEPT, PREFIX, N, "keep")
    ids = visual_position_ids(KEPT, PREFIX, N, PositionPolicy("permute", window=window, seed=7))
    for start in range(0, len(KEPT), window):
        assert sorted(ids[start:start + window].tolist()) == sorted(keep[start:start + window].tolist())
    if window == 1:
        assert torch.equal(ids, keep)
    else:
        assert not torch.equal(ids, keep)


@pytest.mark.parametrize("offset", [-3, 0, 11])
def test_shift_moves_every_visual_id_and_no_text_id(offset):
    keep = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, "keep")
    shifted = sequence_position_ids(KEPT, PREFIX, N, SUFFIX, PositionPolicy("shift", offset=offset))
    text_delta, visual_delta = _split(shifted - keep, PREFIX, len(KEPT))
    assert (text_delta == 0).all()
    assert (visual_delta == offset).all()


def test_shift_with_start_moves_only_later_visual_tokens():
    kept = torch.tensor([9, 0, 3, 6, 2])
    keep = visual_position_ids(kept, 2, 10, "keep")
    shifted = visual_position_ids(kept, 2, 10, "shift:offset=4,start=3")
    assert (shifted - keep).tolist() == [4, 0, 4, 4, 0]


def test_pruning_style_shift_closes_the_gap_of_a_removed_span():
    # Remove visual tokens [span_start, span_end); shift the later ones back by the span's length.
    prefix, num_visual, suffix, span_start, span_end = 2, 10, 3, 2, 5
    kept = torch.tensor([i for i in range(num_visual) if not span_start <= i < span_end])
    policy = PositionPolicy.parse(f"shift:offset={span_start - span_end},start={span_end}")
    ids = sequence_position_ids(kept, prefix, num_visual, suffix, policy)
    # Visual IDs become contiguous (as under reassign); text keeps its original IDs (unlike reassign).
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 14]
    reassign = sequence_position_ids(kept, prefix, num_visual, suffix, "reassign")
    assert torch.equal(ids[: prefix + len(kept)], reassign[: prefix + len(kept)])
    assert next_position_id(ids) == prefix + num_visual + suffix


def test_validate_kept_accepts_and_returns_long():
    out = validate_kept(torch.tensor([3, 0, 2], dtype=torch.int32), 4)
    assert out.dtype == torch.long
    assert out.tolist() == [3, 0, 2]
    assert validate_kept([1, 2], 4).tolist() == [1, 2]


@pytest.mark.parametrize(
    ("kept", "match"),
    [
        (torch.tensor([], dtype=torch.long), "empty"),
        (torch.tensor([0, -1]), r"out of range.*\[-1, 0\]"),
        (torch.tensor([0, 6]), r"out of range.*6 visual tokens"),
        (torch.tensor([1, 2, 1]), "repeats"),
        (torch.tensor([0.0, 1.0]), "integer.*float"),
        (torch.tensor([True, False]), "integer.*bool"),
        (torch.tensor([[0, 1], [2, 3]]), r"1-D.*\(2, 2\)"),
        (torch.tensor(3), r"1-D.*\(\)"),
    ],
)
def test_validate_kept_errors(kept, match):
    with pytest.raises(mllm.KeepSetError, match=match):
        validate_kept(kept, 6)


def test_sequence_position_ids_validates_kept():
    with pytest.raises(mllm.KeepSetError, match="out of range"):
        sequence_position_ids(torch.tensor([0, 6]), 1, 6, 1, "reassign")


@pytest.mark.parametrize(
    "policy",
    [
        PositionPolicy(),
        PositionPolicy("reassign"),
        PositionPolicy("permute", fraction=0.5, window=4, seed=3),
        PositionPolicy("shift", offset=-8, start=100),
    ],
)
def test_policy_str_parse_round_trip(policy):
    assert PositionPolicy.parse(str(policy)) == policy


def test_policy_parse_and_str():
    policy = PositionPolicy.parse(" shift:offset=-8, start=100 ")
    assert (policy.kind, policy.offset, policy.start) == ("shift", -8, 100)
    assert str(policy) == "shift:offset=-8,start=100"
    assert str(PositionPolicy("keep")) == "keep"
    assert PositionPolicy.parse("permute:fraction=0.5").fraction == 0.5
    assert PositionPolicy.parse(policy) is policy


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PositionPolicy("rotate"), "unknown position policy 'rotate'"),
        (lambda: PositionPolicy.parse("rotate"), "unknown position policy"),
        (lambda: PositionPolicy("permute", fraction=1.5), "'fraction'.*1.5"),
        (lambda: PositionPolicy("permute", fraction=-0.1), "'fraction'"),
        (lambda: PositionPolicy.parse("permute:fraction=2"), "'fraction'"),
        (lambda: PositionPolicy("permute", window=0), "'window'"),
        (lambda: PositionPolicy.parse("keep:bogus=1"), "bad field 'bogus=1'"),
        (lambda: PositionPolicy.parse("shift:offset"), "bad field 'offset'"),
        (lambda: PositionPolicy.parse("keep:kind=shift"), "bad field 'kind=shift'"),
    ],
)
def test_policy_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_extra_tokens_take_their_anchors_ids_or_continue_the_numbering():
    kept, anchors = torch.tensor([1, 4]), torch.tensor([2, 2, 5])
    keep = sequence_position_ids(kept, 3, 6, 2, "keep", extra_anchors=anchors)
    assert keep.tolist() == [0, 1, 2, 4, 7, 5, 5, 8, 9, 10]
    reassign = sequence_position_ids(kept, 3, 6, 2, "reassign", extra_anchors=anchors)
    assert reassign.tolist() == list(range(10))
    with pytest.raises(KeepSetError, match="extra-token anchor out of range"):
        sequence_position_ids(kept, 3, 6, 2, "keep", extra_anchors=torch.tensor([6]))
