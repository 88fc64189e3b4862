"""python -m mllm.convert shikra: tiny random originals in the released formats (LLaMA in Hugging Face format, a
Shikra delta with the repository's key names as sharded .bin, a separate CLIP), converted and checked against a
forward written here from the released architecture."""

import io
import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaProcessor,
)

from mllm.convert import ConversionError, convert_shikra, main
from mllm.shikra import ShikraForConditionalGeneration
from mllm.tiny import CLIPImageProcessor

spm = pytest.importorskip("sentencepiece")

WORDS = "where is the red circle blue square green cross left of right above below image object small".split()
LLAMA = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
CLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 56, "patch_size": 14}  # 4 x 4 = 16 patch tokens (Shikra: 224 / 14 -> 256)


def write_tokenizer(directory, vocab, added=("<im_patch>", "<im_start>", "<im_end>")):
    """LLaMA's sentencepiece layout (unk 0, bos 1, eos 2) plus `added` tokens (Shikra's three, as its delta ships
    them)."""
    model = io.BytesIO()
    corpus = [" ".join(WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)]) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    assert size == vocab
    if added:
        (directory / "added_tokens.json").write_text(json.dumps({token: size + i for i, token in enumerate(added)}))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048, "add_bos_token": True}))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """(llama dir, delta dir, clip dir, the merged weights the test computes itself)."""
    root = tmp_path_factory.mktemp("shikra")
    vocab = 64
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA))
    base.save_pretrained(root / "llama")
    base_state = base.state_dict()
    # The delta: what Shikra's make_delta leaves, under the released key names (ShikraLlamaForCausalLM)
    delta = {key: torch.randn_like(value) * 0.01 for key, value in base_state.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        delta[key] = torch.cat([delta[key], torch.randn(3, LLAMA["hidden_size"])])  # the added rows, whole
    delta["model.mm_projector.weight"] = torch.randn(LLAMA["hidden_size"], CLIP_VISION["hidden_size"]) * 0.1
    delta["model.mm_projector.bias"] = torch.randn(LLAMA["hidden_size"]) * 0.1
    delta = {key: value.half() for key, value in delta.items()}  # released in float16
    (root / "delta").mkdir()
    keys = sorted(delta)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({key: delta[key] for key in part}, root / "delta" / name)
    (root / "delta" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: name for name, part in shards.items() for key in part}}))
    (root / "delta" / "config.json").write_text(json.dumps({
        **LLAMA, "architectures": ["ShikraLlamaForCausalLM"], "model_type": "shikra", "vocab_size": vocab + 3,
        "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_vision_select_layer": -2,
        "mm_hidden_size": CLIP_VISION["hidden_size"], "mm_use_im_start_end": True, "use_mm_proj": True,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1, "torch_dtype": "float16"}))
    write_tokenizer(root / "delta", vocab)
    clip = CLIPModel(CLIPConfig(vision_config=CLIP_VISION, text_config={"hidden_size": 32, "intermediate_size": 64,
                                                                         "num_hidden_layers": 1,
                                                                         "num_attention_heads": 4}))
    clip.save_pretrained(root / "clip")
    side = CLIP_VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        root / "clip")
    # apply_delta.py, independently: base + delta in the delta's dtype; the added rows and the projector whole
    merged = {}
    for key, change in delta.items():
        if key.startswith("model.mm_projector"):
            merged[key] = change
        else:
            value = change.clone()
            value[: base_state[key].shape[0]] += base_state[key].half()
            merged[key] = value
    return root / "llama", root / "delta", root / "clip", merged, vocab


@pytest.fixture(scope="module")
def converted(originals, tmp_path_factory):
    llama, delta, clip, _, _ = originals
    return convert_shikra(llama, delta, clip, tmp_path_factory.mktemp("out") / "shikra")


def shikra_forward(originals, input_ids, pixel_values):
    """The released architecture, written from Shikra's ShikraLlamaModel.forward: CLIP hidden_states[-2] without
    CLS, one Linear, the <im_patch> embeddings between <im_start> and <im_end> replaced, LLaMA on the result."""
    _, _, clip_dir, merged, vocab = originals
    clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
    features = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = features @ merged["model.mm_projector.weight"].float().T + merged["model.mm_projector.bias"].float()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab + 3, **LLAMA)).eval()
    llama.load_state_dict({key: value.float() for key, value in merged.items() if "mm_projector" not in key})
    embeds = llama.get_input_embeddings()(input_ids)
    for row in range(len(input_ids)):
        start = int((input_ids[row] == vocab + 1).nonzero()[0])
        assert int(input_ids[row, start + features.shape[1] + 1]) == vocab + 2  # Shikra asserts the same
        embeds[row, start + 1 : start + 1 + features.shape[1]] = projected[row]
    return llama(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).logits


def test_the_converted_model_computes_what_the_released_architecture_does(originals, converted):
    _, _, _, _, vocab = originals
    model = ShikraForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    config = model.config
    assert (config.image_token_id, config.im_start_token_id, config.im_end_token_id) == (vocab, vocab + 1, vocab + 2)
    assert config.model_type == "shikra" and config.vision_feature_layer == -2
    processor = LlavaProcessor.from_pretrained(converted)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Where is the red circle "},
                                      {"type": "image"}, {"type": "text", "text": "?"}]}], add_generation_prompt=True)
    assert prompt.startswith("A chat between a curious user") and prompt.endswith("? ASSISTANT:")
    assert "USER: Where is the red circle <im_start><im_patch><im_end>?" in prompt
    pixels = torch.randn(2, 3, CLIP_VISION["image_size"], CLIP_VISION["image_size"])
    batch = processor(images=[Image.new("RGB", (56, 56))] * 2, text=[prompt] * 2, return_tensors="pt")
    assert int((batch.input_ids[0] == vocab).sum()) == 16  # <im_patch> expanded to one per visual token
    ids = batch.input_ids
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
        expected = shikra_forward(originals, ids, pixels)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_the_merge_is_base_plus_delta_with_the_added_rows_whole(originals, converted):
    _, _, _, merged, vocab = originals
    model = ShikraForConditionalGeneration.from_pretrained(converted, dtype=torch.float16)
    state = model.state_dict()
    assert torch.equal(state["model.language_model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert torch.equal(state["lm_head.weight"][vocab:], merged["lm_head.weight"][vocab:])
    assert torch.equal(state["model.multi_modal_projector.bias"], merged["model.mm_projector.bias"])
    assert torch.equal(state["model.language_model.layers.1.mlp.up_proj.weight"],
                       merged["model.layers.1.mlp.up_proj.weight"])


def copy_originals(originals, tmp_path):
    llama, delta, clip, _, _ = originals
    return (shutil.copytree(llama, tmp_path / "llama"), shutil.copytree(delta, tmp_path / "delta"),
            shutil.copytree(clip, tmp_path / "clip"))


def test_a_base_with_another_vocabulary_is_refused_by_file_and_field(originals, tmp_path):
    llama, delta, clip = copy_originals(originals, tmp_path)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "vocab_size": 32001}))
    with pytest.raises(ConversionError, match=r"llama/config\.json: field 'vocab_size' is 32001"):
        convert_shikra(llama, delta, clip, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_delta_tensor_of_the_wrong_shape_is_refused_by_name(originals, tmp_path):
    llama, delta, clip = copy_originals(originals, tmp_path)
    shard = delta / "pytorch_model-00001-of-00002.bin"
    tensors = torch.load(shard, weights_only=True)
    key = next(key for key in tensors if "layers.0.self_attn.q_proj" in key)
    tensors[key] = tensors[key][:, :-1]
    torch.save(tensors, shard)
    assert main(["shikra", "--llama", str(llama), "--delta", str(delta), "--clip", str(clip),
                 "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(ConversionError, match=rf"{key!r} has shape \(48, 47\)"):
        convert_shikra(llama, delta, clip, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_delta_missing_a_tensor_and_a_clip_of_another_width_are_refused(originals, tmp_path):
    llama, delta, clip = copy_originals(originals, tmp_path)
    config = json.loads((clip / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 64
    (clip / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"clip/config\.json: field 'hidden_size' is 64"):
        convert_shikra(llama, delta, clip, tmp_path / "out")
    shutil.rmtree(clip)
    shutil.copytree(originals[2], clip)
    processor_config = (clip / "preprocessor_config.json").read_text()
    (clip / "preprocessor_config.json").unlink()
    with pytest.raises(ConversionError, match=r"clip/preprocessor_config\.json: not found"):
        convert_shikra(llama, delta, clip, tmp_path / "out")
    (clip / "preprocessor_config.json").write_text(processor_config)
    shard = delta / "pytorch_model-00002-of-00002.bin"
    tensors = torch.load(shard, weights_only=True)
    dropped = sorted(key for key in tensors if key.startswith("model.layers"))[0]
    del tensors[dropped]
    torch.save(tensors, shard)
    index = json.loads((delta / "pytorch_model.bin.index.json").read_text())
    del index["weight_map"][dropped]
    (delta / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=rf"the delta has no tensor {dropped!r}"):
        convert_shikra(llama, delta, clip, tmp_path / "out")


def test_an_existing_output_is_never_overwritten(originals, converted):
    llama, delta, clip, _, _ = originals
    before = sorted(path.name for path in converted.iterdir())
    with pytest.raises(ConversionError, match="exists"):
        convert_shikra(llama, delta, clip, converted)
    assert sorted(path.name for path in converted.iterdir()) == before
