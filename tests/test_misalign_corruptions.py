"""misalign.corruptions: every kind keeps all visual tokens, touches only visual IDs, and is seeded."""

from __future__ import annotations

import pytest
import torch

from misalign import CORRUPTIONS, make_corruption
from mllm import KeepSetError, VisualLayout, position_ids, sequence_position_ids
from tests.conftest import PROMPTS

N, PREFIX, SUFFIX = 64, 5, 7
STRENGTHS = {"identity": [0, 1], "permuted": [0, 0.1, 1], "shifted": [0, 8, -3], "span-shift": [0, 4, 20],
             "token-permutation": [0, 0.1, 1], "transposed": [0, 1]}
# LLaVA's one axis, and Qwen2-VL's M-RoPE (t, h, w) over an 8x8 grid of visual tokens.
LAYOUTS = {"1-axis": VisualLayout.sequential(PREFIX, N, SUFFIX), "m-rope": VisualLayout.grid(PREFIX, 8, 8, SUFFIX)}


def ids(corruption):
    return sequence_position_ids(corruption.order, PREFIX, N, SUFFIX, corruption.policy)


def test_every_registered_kind_is_tested():
    assert set(CORRUPTIONS) == set(STRENGTHS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", sorted(STRENGTHS))
def test_corruptions_keep_every_token_and_touch_only_visual_ids(kind, layout):
    layout = LAYOUTS[layout]
    identity = position_ids(torch.arange(N), layout, make_corruption("identity").at(0, N).policy)
    for strength in STRENGTHS[kind]:
        corruption = make_corruption(kind).at(strength, N, seed=1)
        assert sorted(corruption.order.tolist()) == list(range(N))  # nothing dropped
        if kind == "transposed" and strength and layout.num_axes == 1:
            with pytest.raises(KeepSetError, match="transpose"):
                position_ids(corruption.order, layout, corruption.policy)
            continue
        got = position_ids(corruption.order, layout, corruption.policy)
        assert torch.equal(got[:, :PREFIX], identity[:, :PREFIX])
        assert torch.equal(got[:, -SUFFIX:], identity[:, -SUFFIX:])
        if strength == 0:
            assert torch.equal(got, identity) and torch.equal(corruption.order, torch.arange(N))


def test_m_rope_kinds_do_what_they_say():
    layout = LAYOUTS["m-rope"]
    original = layout.visual_ids
    visual = slice(PREFIX, PREFIX + N)

    def visual_ids(corruption):
        return position_ids(corruption.order, layout, corruption.policy)[:, visual]

    transposed = visual_ids(make_corruption("transposed").at(1, N))
    assert torch.equal(transposed, original[[0, 2, 1]])  # h and w swapped, t as it was
    shifted = visual_ids(make_corruption("shifted", axis=2).at(3, N))
    assert torch.equal(shifted[2], original[2] + 3) and torch.equal(shifted[:2], original[:2])
    permuted = visual_ids(make_corruption("permuted", axis=1).at(1.0, N, seed=0))
    assert torch.equal(permuted[[0, 2]], original[[0, 2]]) and not torch.equal(permuted[1], original[1])
    assert sorted(permuted[1].tolist()) == sorted(original[1].tolist())
    reordered = make_corruption("token-permutation").at(1.0, N, seed=0)
    assert torch.equal(visual_ids(reordered), original)  # each slot keeps its grid IDs, tokens moved
    with pytest.raises(ValueError, match="strength is 0"):
        make_corruption("transposed").at(0.5, N)


def test_each_kind_does_what_it_says():
    visual = slice(PREFIX, PREFIX + N)
    original = torch.arange(N) + PREFIX
    permuted = make_corruption("permuted").at(0.5, N, seed=0)
    moved = (ids(permuted)[visual] != original).sum()
    assert 0 < moved <= 32 and sorted(ids(permuted)[visual].tolist()) == original.tolist()
    windowed = ids(make_corruption("permuted", window=8).at(1.0, N, seed=0))[visual]
    assert torch.equal((windowed - PREFIX) // 8, torch.arange(N) // 8)  # IDs stay inside their window
    assert torch.equal(ids(make_corruption("shifted").at(8, N))[visual], original + 8)
    span = ids(make_corruption("span-shift", start=10).at(4, N))[visual]
    assert torch.equal(span[:14], original[:14]) and torch.equal(span[14:], original[14:] - 4)
    reordered = make_corruption("token-permutation").at(1.0, N, seed=0)
    assert torch.equal(ids(reordered)[visual], original)  # IDs sequential...
    assert not torch.equal(reordered.order, torch.arange(N))  # ...over tokens in another order


@pytest.mark.parametrize("kind", ["permuted", "token-permutation"])
def test_same_seed_same_ids(kind):
    first, again = (make_corruption(kind).at(0.5, N, seed=3) for _ in range(2))
    other = make_corruption(kind).at(0.5, N, seed=4)
    assert torch.equal(ids(first), ids(again)) and torch.equal(first.order, again.order)
    assert not (torch.equal(ids(first), ids(other)) and torch.equal(first.order, other.order))


def test_identity_reproduces_the_unablated_model_exactly(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    plain = tiny_model.generate(encoding, max_new_tokens=6, output_logits=True)
    corruption = make_corruption("identity").at(0, tiny_model.num_visual_tokens)
    keep = corruption.order.expand(len(images), -1)
    ablated = tiny_model.generate(encoding, keep=keep, policy=corruption.policy, max_new_tokens=6, output_logits=True)
    assert ablated.texts == plain.texts
    assert all(torch.equal(a, b) for a, b in zip(ablated.position_ids, plain.position_ids))
    torch.testing.assert_close(ablated.prefill_logits, plain.prefill_logits, rtol=0, atol=0)


def test_bad_kinds_and_strengths_are_named():
    with pytest.raises(ValueError, match="unknown corruption 'rotated'"):
        make_corruption("rotated")
    with pytest.raises(ValueError, match=r"number of positions, got 0\.5"):
        make_corruption("shifted").at(0.5, N)
    with pytest.raises(ValueError, match="'fraction' must lie in"):
        make_corruption("permuted").at(1.5, N)
