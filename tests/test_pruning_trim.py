"""trim against a loop written from the reference code, with a tiny random CLIP checkpoint on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
)

from mllm.tiny import TinyLlavaConfig
from pruning import Budget, make_method, method_spec, prune_generate
from pruning.methods.prumerge import centroid_patch
from pruning.methods.trim import question_text
from tests.conftest import PROMPTS

TEXT_LENGTH = 32  # shorter than the longest prompt, so truncation is exercised


def build_tiny_clip(directory, vision_hidden: int = TinyLlavaConfig().vision_hidden, seed: int = 0):
    """A random CLIPModel and a character-level tokenizer in CLIP's layout: <|startoftext|> text <|endoftext|>."""
    specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {token: index for index, token in enumerate([*specials, *(chr(code) for code in range(32, 127)), "\n"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
                                        model_max_length=TEXT_LENGTH, model_input_names=["input_ids", "attention_mask"])
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": TEXT_LENGTH, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1, "projection_dim": 24},
        vision_config={"hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 24},
        projection_dim=24,
    )
    # The sub-configs carry projection_dim too, as openai's do: the reference loads the towers on their own.
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    with torch.no_grad():  # not the identity, so that using the LLaVA tower's post_layernorm instead would show
        clip.vision_model.post_layernorm.weight.normal_(1.0, 0.5)
        clip.vision_model.post_layernorm.bias.normal_(0.0, 0.5)
    clip.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def encoding(tiny_model, images):
    return tiny_model.encode(images, PROMPTS, vision_hidden_states=True)


def reference_scores(clip_dir, features, texts, sign=-1.0):
    """The reference's `token_reduction`: softmax(-(visual_projection(post_layernorm(x)) · text_embeds))."""
    from transformers import AutoTokenizer

    text_tower = CLIPTextModelWithProjection.from_pretrained(clip_dir, local_files_only=True).eval()
    vision_tower = CLIPVisionModelWithProjection.from_pretrained(clip_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    out = []
    with torch.no_grad():
        for row, text in enumerate(texts):
            text_inputs = tokenizer(text=[text.replace("<image>", " ")], return_tensors="pt", truncation=True,
                                    padding=True)
            text_features = text_tower(**text_inputs).text_embeds
            normalized = vision_tower.vision_model.post_layernorm(features[row : row + 1])
            projected = vision_tower.visual_projection(normalized)
            similarities = torch.matmul(projected, text_features.unsqueeze(2)).squeeze(2)
            out.append(torch.softmax(sign * similarities, dim=-1)[0])
    return torch.stack(out)


def test_scores_and_selection_match_the_reference_loop(tiny_model, clip_dir, encoding):
    method = make_method(f"trim:clip={clip_dir}")
    features = tiny_model.adapter.projector_inputs(encoding.vision_hidden_states).float()
    expected = reference_scores(clip_dir, features, PROMPTS)
    scores = method.scores(tiny_model, encoding)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    # The CLIP checkpoint's post_layernorm, not the LLaVA tower's (the identity here).
    tower = tiny_model.adapter.vision_tower.post_layernorm
    assert not torch.allclose(tower(features), method.clip_parts(tiny_model)["post_layernorm"](features))

    selection = method.select(tiny_model, encoding, 7)  # 6 patches and the mean token
    for row, kept in enumerate(selection.kept):
        assert kept.tolist() == sorted(expected[row].topk(6).indices.tolist())  # ascending index order
        dropped = torch.tensor([index for index in range(encoding.num_visual) if index not in kept.tolist()])
        mean = features[row, dropped].mean(dim=0)
        torch.testing.assert_close(selection.extra[row, 0], tiny_model.adapter.project(mean[None, None])[0, 0],
                                   rtol=1e-5, atol=1e-6)
        assert int(selection.extra_anchors[row, 0]) == centroid_patch(dropped, torch.ones(len(dropped)), encoding.grid)

    positive = make_method(f"trim:clip={clip_dir},sign=positive")
    by_similarity = reference_scores(clip_dir, features, PROMPTS, sign=1.0)
    torch.testing.assert_close(positive.scores(tiny_model, encoding), by_similarity, rtol=1e-5, atol=1e-7)
    flipped = positive.select(tiny_model, encoding, 7)
    for row, kept in enumerate(flipped.kept):
        assert kept.tolist() == sorted(by_similarity[row].topk(6).indices.tolist())
    assert any(a.tolist() != b.tolist() for a, b in zip(selection.kept, flipped.kept))


def test_the_question_is_the_user_message(tiny_model, images):
    encoding = tiny_model.encode(images, PROMPTS)
    assert [question_text(encoding, row, "<image>") for row in range(len(PROMPTS))] == PROMPTS
    # A raw prompt is fed whole, its placeholder a space (as the reference treats `<image>`).
    raw = tiny_model.encode(images[:1], ["Look: <image>\nwhat?"], raw_prompts=True)
    assert question_text(raw, 0, "<image>") == "Look:  \nwhat?"


def test_ratio_zero_reproduces_the_unpruned_model(tiny_model, clip_dir, images):
    method = make_method(f"trim:clip={clip_dir}")
    encoding = tiny_model.encode(images, PROMPTS, **method.encode_options(tiny_model))
    plain = tiny_model.generate(encoding, max_new_tokens=4, output_logits=True)
    for positions in ("keep", "reassign-raster", "reassign"):  # raster order, so reassign too
        pruned = prune_generate(tiny_model, encoding, method, Budget(pruned=0.0), positions, max_new_tokens=4,
                                output_logits=True)
        assert pruned.texts == plain.texts and pruned.num_extra == 0
        torch.testing.assert_close(pruned.prefill_logits, plain.prefill_logits, rtol=0, atol=0)


@pytest.mark.parametrize("mean_token", [True, False])
def test_the_budget_counts_every_token_fed(tiny_model, clip_dir, encoding, mean_token):
    method = make_method(f"trim:clip={clip_dir},mean_token={str(mean_token).lower()}")
    for budget in ("0.25", "0.5", "0.9", "keep=3"):
        expected = Budget.parse(budget).num_kept(encoding.num_visual)
        for positions in ("reassign", "keep"):
            out = prune_generate(tiny_model, encoding, method, budget, positions, max_new_tokens=1)
            assert out.num_extra == int(mean_token)
            for kept in out.kept:
                assert len(kept) + out.num_extra == expected
                assert kept.tolist() == sorted(set(kept.tolist()))  # emitted in ascending index order


def test_adaptive_keeps_the_iqr_outliers(tiny_model, clip_dir, encoding):
    method = make_method(f"trim:clip={clip_dir},adaptive=true")
    assert method.adaptive
    selection = method.select(tiny_model, encoding, 16)
    scores = method.scores(tiny_model, encoding)
    for row, kept in enumerate(selection.kept):
        values = scores[row].numpy()
        low, high = np.percentile(values, [25, 75])
        count = max(1, int((values > high + 1.5 * (high - low)).sum()))
        assert kept.tolist() == sorted(scores[row].topk(count).indices.tolist())
    assert selection.extra.shape[:2] == (encoding.batch_size, 1)


def test_the_mean_token_takes_its_anchors_position(tiny_model, clip_dir, encoding):
    out = prune_generate(tiny_model, encoding, f"trim:clip={clip_dir},extra_position=last", "0.5", "keep",
                         max_new_tokens=1)
    for row in range(encoding.batch_size):
        prefix, kept = encoding.layout(row)[1], len(out.kept[row])
        assert int(out.position_ids[row][0, prefix + kept]) == prefix + encoding.num_visual - 1


def test_a_batch_of_four_equals_four_single_calls(tiny_model, clip_dir, images):
    method = make_method(f"trim:clip={clip_dir}")

    def run(batch_images, prompts):
        encoding = tiny_model.encode(batch_images, prompts, **method.encode_options(tiny_model))
        return prune_generate(tiny_model, encoding, method, "0.5", "reassign", max_new_tokens=4, output_logits=True)

    batched = run(images, PROMPTS)
    for row, (image, prompt) in enumerate(zip(images, PROMPTS)):
        single = run([image], [prompt])
        assert single.texts[0] == batched.texts[row]
        assert torch.equal(single.kept[0], batched.kept[row])
        real = batched.prefill_mask[row]
        torch.testing.assert_close(single.prefill_logits[0, -1], batched.prefill_logits[row, real][-1],
                                   rtol=1e-4, atol=1e-4)


def test_bad_checkpoints_are_named(tiny_model, tiny_checkpoint, clip_dir, images, tmp_path):
    with pytest.raises(ValueError, match=r"needs a local CLIP checkpoint.*trim:clip="):
        make_method("trim")
    missing = tmp_path / "no-such-clip"
    with pytest.raises(ValueError, match=f"{missing} does not exist"):
        make_method(f"trim:clip={missing}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} has no config.json"):
        make_method(f"trim:clip={empty}")
    with pytest.raises(ValueError, match="field 'model_type' is 'llava'"):
        make_method(f"trim:clip={tiny_checkpoint}")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=f"{no_weights} has no weights"):
        make_method(f"trim:clip={no_weights}")
    with pytest.raises(ValueError, match="sign must be 'negative'"):
        make_method(f"trim:clip={clip_dir},sign=plus")

    wide = build_tiny_clip(tmp_path / "wide-clip", vision_hidden=48)
    method = make_method(f"trim:clip={wide}")  # the width is checked against a model, when there is one
    needle = rf"{wide}/config.json: field 'vision_config.hidden_size' is 48, but the model's vision tower is 32"
    with pytest.raises(ValueError, match=needle):
        method.encode_options(tiny_model)
    encoding = tiny_model.encode(images[:1], PROMPTS[:1], vision_hidden_states=True)
    with pytest.raises(ValueError, match=needle):
        prune_generate(tiny_model, encoding, method, "0.5")


def test_the_spec_round_trips(clip_dir):
    spec = f"trim:clip={clip_dir},sign=positive,extra_position=last"
    assert method_spec(make_method(spec)) == spec
