"""Shikra (Chen et al. 2023) as a transformers model: LLaVA's layout with Shikra's single linear projector.

Shikra is released only in its own repository's format (`shikras/shikra`: `ShikraLlamaForCausalLM`, a LLaMA
whose `model.mm_projector` is one `Linear(1024, 4096)`, with CLIP ViT-L/14 at 224 px loaded beside it), as a
delta on LLaMA-7B. `python -m mllm.convert shikra` applies the delta and writes this class's checkpoint, so
`mllm.load` reads Shikra like any local checkpoint. Its architecture, as released:

- CLIP's `hidden_states[-2]`, CLS dropped: 16 x 16 = 256 patch tokens of width 1024;
- one linear projector (with bias) to the LLM's width, no activation;
- the 256 tokens replace 256 `<im_patch>` tokens between `<im_start>` and `<im_end>`, whose own embeddings stay;
- a LLaMA with 1-D RoPE, every token numbered consecutively.

`LlavaForConditionalGeneration` computes exactly this once its MLP projector is a single `nn.Linear`, so the
class is that model with that projector, `model_type` "shikra".
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaModel

SHIKRA_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")  # as Shikra adds them: ids V, V + 1, V + 2
# The vicuna_v1.1 conversation Shikra is trained and evaluated with (its mllm/conversation/base_conversation.py):
# system prompt, then "USER: ... ASSISTANT:"; an image is <im_start> + one <im_patch> per visual token + <im_end>,
# placed where the message puts it.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
SHIKRA_CHAT_TEMPLATE = (
    '{{ "' + VICUNA_SYSTEM + '" }}'
    "{% for message in messages %}{{ ' ' + message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<im_start><im_patch><im_end>' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


class ShikraConfig(LlavaConfig):
    """`LlavaConfig` plus the ids of Shikra's `<im_start>` / `<im_end>` (`image_token_id` is `<im_patch>`)."""

    model_type = "shikra"
    im_start_token_id: int = 32001
    im_end_token_id: int = 32002


class ShikraModel(LlavaModel):
    config_class = ShikraConfig

    def __init__(self, config: ShikraConfig) -> None:
        super().__init__(config)
        # Shikra's `mm_projector`: nn.Linear(mm_hidden_size, hidden_size), no activation, no second layer.
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.post_init()


class ShikraForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = ShikraConfig

    def __init__(self, config: ShikraConfig) -> None:
        super().__init__(config)
        self.model = ShikraModel(config)
        self.post_init()


AutoConfig.register("shikra", ShikraConfig)
