"""MiniGPT-v2 (Chen et al. 2023) as a transformers model: EVA ViT-g, four patches to one LLM token, Llama-2-chat.

MiniGPT-v2 is released only in its own repository's format (Vision-CAIR/MiniGPT-4: `MiniGPTv2`, whose checkpoint
holds the projector and the LoRA factors; EVA ViT-g and Llama-2-7b-chat are loaded beside it).
`python -m mllm.convert minigptv2` merges them into this class's checkpoint, so `mllm.load` reads MiniGPT-v2 like
any local checkpoint. Its architecture, as released (`MiniGPTv2.encode_img`):

- EVA ViT-g/14 at 448 px: 32 x 32 = 1024 patches and a CLS token, 39 pre-norm blocks with q and v biases (k has
  none), absolute position embeddings, no final norm: transformers' `Blip2VisionModel` computes exactly this, its
  `post_layernorm` left unused (the last block's hidden state is read);
- `ln_vision`, a LayerNorm of its own (eps 1e-5, where the blocks' is 1e-6), then the CLS token dropped;
- every four consecutive patch tokens in raster order concatenated into one (a 1 x 4 horizontal strip: 256
  tokens on a 32 x 8 grid), then `llama_proj`, one `Linear(4 x 1408, 4096)`;
- the 256 tokens spliced into Llama-2-chat (its LoRA on q and v merged) where the prompt's `<ImageHere>` is,
  every token numbered consecutively (1-D RoPE).

The image placeholder is Llama's `<unk>` (id 0), which byte fallback never produces from text, so the released
vocabulary and `lm_head` stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, Blip2VisionModel, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

# MiniGPT-v2's conversation (its conversation.py `CONV_VISION_minigptv2` and eval_utils.py `prepare_texts`):
# "<s>[INST] <Img><ImageHere></Img> {question} [/INST]"; the tokenizer adds its own BOS before the literal <s>,
# as the original's evaluation does. MiniGPT-v2 tokenizes the text after the image as a segment of its own
# (`get_context_emb`), which SentencePiece opens with its dummy-prefix "▁": the space before </Img> gives it.
MINIGPTV2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<s>[INST] ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<Img><unk> </Img> ' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for content in message['content'] %}{{ content['text'] }}{% endfor %}{% endif %}{% endfor %}"
)


class MiniGPTv2Config(LlavaConfig):
    """`LlavaConfig` with a `Blip2VisionConfig` tower, `tokens_per_group` patches per LLM token, `ln_vision`'s eps."""

    model_type = "minigptv2"
    tokens_per_group: int = 4
    ln_vision_eps: float = 1e-5


class MiniGPTv2Projector(nn.Module):
    """`ln_vision`, then each `tokens_per_group` consecutive patch tokens concatenated, then `llama_proj`."""

    def __init__(self, config: MiniGPTv2Config) -> None:
        super().__init__()
        width = config.vision_config.hidden_size
        self.group = config.tokens_per_group
        self.ln_vision = nn.LayerNorm(width, eps=config.ln_vision_eps)
        self.linear = nn.Linear(width * self.group, config.text_config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, count, width = patches.shape
        if count % self.group:
            raise ValueError(f"{count} patch tokens do not make groups of {self.group}")
        grouped = self.ln_vision(patches).reshape(batch, count // self.group, width * self.group)
        return self.linear(grouped)


class MiniGPTv2Model(LlavaModel):
    config_class = MiniGPTv2Config

    def __init__(self, config: MiniGPTv2Config) -> None:
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel's own builds its tower with AutoModel, which has no
        self.vision_tower = Blip2VisionModel(config.vision_config)  # entry for Blip2VisionConfig
        self.multi_modal_projector = MiniGPTv2Projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class MiniGPTv2ForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MiniGPTv2Config

    def __init__(self, config: MiniGPTv2Config) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MiniGPTv2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register("minigptv2", MiniGPTv2Config)
