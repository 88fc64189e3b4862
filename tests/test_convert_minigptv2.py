"""python -m mllm.convert minigptv2: tiny random originals in the released formats (a MiniGPT-v2 .pth holding
llama_proj and peft's LoRA factors, LAVIS' EVA state dict, Llama in Hugging Face format), converted and checked
against a forward written here from MiniGPT-v2's code (eva_vit.py, MiniGPTv2.encode_img, get_context_emb)."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_convert_shikra import write_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaProcessor

from mllm.convert import main
from mllm.convert_common import ConversionError
from mllm.convert_minigptv2 import EvaShape, convert_minigptv2
from mllm.minigptv2 import MiniGPTv2Config, MiniGPTv2ForConditionalGeneration
from mllm.tiny import CLIP_MEAN, CLIP_STD

pytest.importorskip("sentencepiece")

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
WIDTH, HEAD, DEPTH, MLP, PATCH, SIDE = 16, 8, 2, 40, 14, 56  # 4 x 4 = 16 patches -> 4 LLM tokens
SHAPE = EvaShape(depth=DEPTH, head_dim=HEAD, image_size=SIDE)
RANK, ALPHA = 4, 16.0


def eva_state(generator):
    """LAVIS' eva_vit_g.pth layout: positions for a 2 x 2 grid (interpolated to 4 x 4 at conversion), DEPTH + 1
    blocks (the last is one MiniGPT-v2 does not build)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    state = {"cls_token": rand(1, 1, WIDTH), "pos_embed": rand(1, 5, WIDTH),
             "patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(WIDTH)}
    for block in range(DEPTH + 1):
        prefix = f"blocks.{block}."
        state |= {prefix + "norm1.weight": 1 + rand(WIDTH), prefix + "norm1.bias": rand(WIDTH),
                  prefix + "attn.qkv.weight": rand(3 * WIDTH, WIDTH), prefix + "attn.q_bias": rand(WIDTH),
                  prefix + "attn.v_bias": rand(WIDTH), prefix + "attn.proj.weight": rand(WIDTH, WIDTH),
                  prefix + "attn.proj.bias": rand(WIDTH), prefix + "norm2.weight": 1 + rand(WIDTH),
                  prefix + "norm2.bias": rand(WIDTH), prefix + "mlp.fc1.weight": rand(MLP, WIDTH),
                  prefix + "mlp.fc1.bias": rand(MLP), prefix + "mlp.fc2.weight": rand(WIDTH, MLP),
                  prefix + "mlp.fc2.bias": rand(WIDTH)}
    return state


def lora_key(layer, projection, factor):
    return f"llama_model.base_model.model.model.layers.{layer}.self_attn.{projection}_proj.lora_{factor}.weight"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigptv2")
    generator = torch.Generator().manual_seed(0)
    vocab = 64
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **LLAMA)).save_pretrained(root / "llama")
    write_tokenizer(root / "llama", vocab, added=())
    torch.save(eva_state(generator), root / "eva_vit_g.pth")
    trained = {"llama_proj.weight": torch.randn(LLAMA["hidden_size"], 4 * WIDTH, generator=generator) * 0.2,
               "llama_proj.bias": torch.randn(LLAMA["hidden_size"], generator=generator) * 0.2,
               "ln_vision.weight": 1 + torch.randn(WIDTH, generator=generator) * 0.1,
               "ln_vision.bias": torch.randn(WIDTH, generator=generator) * 0.1}
    for layer in range(LLAMA["num_hidden_layers"]):
        for projection in "qv":
            trained[lora_key(layer, projection, "A")] = torch.randn(RANK, LLAMA["hidden_size"], generator=generator)
            trained[lora_key(layer, projection, "B")] = torch.randn(LLAMA["hidden_size"], RANK,
                                                                    generator=generator) * 0.05
    torch.save({"model": trained, "config": {"model": {"lora_r": RANK, "lora_alpha": ALPHA}}, "epoch": 3},
               root / "minigptv2.pth")
    return root


@pytest.fixture(scope="module")
def converted(originals, tmp_path_factory):
    return convert_minigptv2(originals / "minigptv2.pth", originals / "eva_vit_g.pth", originals / "llama",
                             tmp_path_factory.mktemp("out") / "minigptv2", shape=SHAPE)


def eva_forward(eva, pixels):
    """eva_vit.py's VisionTransformer.forward_features, written here: patch conv, CLS, positions interpolated
    16x16 -> 32x32 style (bicubic, align_corners False), pre-norm blocks with [q_bias, 0, v_bias], no final norm."""
    x = F.conv2d(pixels, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    grid = SIDE // PATCH
    table = eva["pos_embed"][:, 1:].reshape(1, 2, 2, WIDTH).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    positions = torch.cat([eva["pos_embed"][:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)], dim=1)
    x = torch.cat([eva["cls_token"].expand(len(x), -1, -1), x], dim=1) + positions
    heads = WIDTH // HEAD
    for block in range(DEPTH):
        p = {key.removeprefix(f"blocks.{block}."): value for key, value in eva.items()
             if key.startswith(f"blocks.{block}.")}
        h = F.layer_norm(x, (WIDTH,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        bias = torch.cat([p["attn.q_bias"], torch.zeros(WIDTH), p["attn.v_bias"]])
        qkv = (h @ p["attn.qkv.weight"].T + bias).reshape(len(x), -1, 3, heads, HEAD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * HEAD ** -0.5, qkv[1], qkv[2]
        attended = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(len(x), -1, WIDTH)
        x = x + attended @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = F.layer_norm(x, (WIDTH,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x


def minigptv2_logits(root, pixels, segments):
    """MiniGPT-v2's forward: encode_img (ln_vision, CLS dropped, 4 tokens concatenated, llama_proj), the image
    embeddings between the prompt's segments (get_context_emb), Llama with its LoRA applied unmerged."""
    saved = torch.load(root / "minigptv2.pth", weights_only=True)["model"]
    eva = torch.load(root / "eva_vit_g.pth", weights_only=True)
    image = F.layer_norm(eva_forward(eva, pixels), (WIDTH,), saved["ln_vision.weight"], saved["ln_vision.bias"],
                         eps=1e-5)[:, 1:]
    image = image.reshape(len(pixels), -1, 4 * WIDTH) @ saved["llama_proj.weight"].T + saved["llama_proj.bias"]
    llama = LlamaForCausalLM.from_pretrained(root / "llama").eval()
    for layer, block in enumerate(llama.model.layers):
        for projection in "qv":
            module = getattr(block.self_attn, f"{projection}_proj")
            down, up = saved[lora_key(layer, projection, "A")], saved[lora_key(layer, projection, "B")]
            module.forward = (lambda x, m=module, a=down, b=up: F.linear(x, m.weight) + ALPHA / RANK * (x @ a.T) @ b.T)
    embed = llama.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor([segments[0]])), image, embed(torch.tensor([segments[1]]))], dim=1)
    return llama(inputs_embeds=embeds).logits


def test_the_converted_forward_is_minigptv2s(originals, converted):
    tokenizer = AutoTokenizer.from_pretrained(originals / "llama")
    segments = [tokenizer("<s>[INST] <Img>").input_ids,
                tokenizer("</Img> [refer] give me the location of red circle [/INST]",
                          add_special_tokens=False).input_ids]
    pixels = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = minigptv2_logits(originals, pixels, segments)
        model = MiniGPTv2ForConditionalGeneration.from_pretrained(converted).eval()
        count = model.config.image_seq_length
        ids = torch.tensor([segments[0] + [model.config.image_token_id] * count + segments[1]])
        ours = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    assert count == (SIDE // PATCH) ** 2 // 4 and expected.shape == ours.shape
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


def test_the_processor_squashes_to_the_side_with_clip_statistics_and_counts_one_token_per_strip(converted):
    processor = LlavaProcessor.from_pretrained(converted)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8))
    batch = processor(images=[image], text=["<unk>"], return_tensors="pt")
    # Blip2ImageEvalProcessor: Resize((448, 448), BICUBIC), ToTensor, Normalize(CLIP mean, std)
    expected = np.asarray(image.resize((SIDE, SIDE), Image.BICUBIC), dtype=np.float32) / 255
    expected = (expected - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    np.testing.assert_allclose(batch.pixel_values[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    image_token = MiniGPTv2Config.from_pretrained(converted).image_token_id
    assert image_token == processor.tokenizer.unk_token_id != processor.tokenizer.pad_token_id
    assert (batch.input_ids == image_token).sum() == (SIDE // PATCH) ** 2 // 4


def test_the_chat_template_tokenizes_as_minigptv2_splices_its_segments(converted):
    """get_context_emb: the prompt split at <ImageHere>, the first segment with BOS (a second one, the literal <s>),
    the second tokenized on its own."""
    processor = LlavaProcessor.from_pretrained(converted)
    tokenizer = processor.tokenizer
    question = "[refer] give me the location of red circle"
    segments = [tokenizer("<s>[INST] <Img>").input_ids,
                tokenizer(f"</Img> {question} [/INST]", add_special_tokens=False).input_ids]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": question}]}],
                                         add_generation_prompt=True)
    assert text == f"<s>[INST] <Img><unk> </Img> {question} [/INST]"
    ids = processor(images=[Image.new("RGB", (SIDE, SIDE))], text=[text], return_tensors="pt").input_ids[0]
    assert ids.tolist() == segments[0] + [tokenizer.unk_token_id] * 4 + segments[1]
    assert ids[:2].tolist() == [tokenizer.bos_token_id] * 2


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda root, saved, eva: saved["model"].pop(lora_key(1, "v", "B")), "no LoRA factor B"),
    (lambda root, saved, eva: saved["model"].__setitem__("llama_model.extra.weight", torch.zeros(1)),
     "'llama_model.extra.weight' has no place"),
    (lambda root, saved, eva: saved["model"].__setitem__("llama_proj.weight", torch.zeros(32, 3 * WIDTH)),
     "llama_proj.weight has shape"),
    (lambda root, saved, eva: eva.pop("blocks.1.attn.q_bias"), "'blocks.1.attn.q_bias'"),
    (lambda root, saved, eva: saved["model"].pop(lora_key(0, "q", "A")), "no LoRA factor A"),
])
def test_a_broken_original_is_refused_by_name_and_nothing_is_written(originals, tmp_path, break_it, message):
    saved = torch.load(originals / "minigptv2.pth", weights_only=True)
    eva = torch.load(originals / "eva_vit_g.pth", weights_only=True)
    break_it(tmp_path, saved, eva)
    torch.save(saved, tmp_path / "minigptv2.pth")
    torch.save(eva, tmp_path / "eva.pth")
    with pytest.raises(ConversionError, match=message):
        convert_minigptv2(tmp_path / "minigptv2.pth", tmp_path / "eva.pth", originals / "llama", tmp_path / "out",
                          shape=SHAPE)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_the_cli_refuses_an_existing_out_and_a_file_that_is_no_checkpoint(originals, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["minigptv2", "--checkpoint", str(originals / "minigptv2.pth"), "--eva", str(originals / "eva_vit_g.pth"),
            "--llama", str(originals / "llama")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().out and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "not.pth").write_text("text")
    shutil.copy(originals / "eva_vit_g.pth", tmp_path / "eva.pth")
    assert main(["minigptv2", "--checkpoint", str(tmp_path / "not.pth"), "--eva", str(tmp_path / "eva.pth"),
                 "--llama", str(originals / "llama"), "--out", str(tmp_path / "new")]) == 2
    assert "not.pth: not a PyTorch checkpoint" in capsys.readouterr().out
