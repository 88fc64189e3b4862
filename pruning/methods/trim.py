"""`trim`: keep the patches CLIP scores against the question, plus the mean of the rest (TRIM).

As TRIM's reference (FreedomIntelligence/TRIM, `clip_encoder.py::CLIPVisionTower.token_reduction`, the
`TextSim+` branch; REFERENCES.md section 4):

- Scores: `v = visual_projection(post_layernorm(x))` for the patch features x that LLaVA's projector reads,
  `t` = the CLIP text tower's projected pooled (EOS) embedding of the question, not normalised, and
  `s = softmax(-v·t)` over the patches, all in fp32. The reference code negates the dot product, so it keeps
  the patches *least* aligned with the question; the paper's wording ("similarity") suggests the opposite.
  `sign=negative` (default) follows the code, `sign=positive` scores by `softmax(+v·t)`.
- The CLIP parts come from a local CLIP checkpoint, `trim:clip=/path/to/clip-vit-large-patch14-336` (the one
  the LLaVA vision tower came from), read offline; its config is checked when the method is made, its
  weights load on first use. `post_layernorm` is that checkpoint's, not the LLaVA vision tower's: for
  LLaVA-1.5 (a frozen tower) they are the same weights, but LLaVA never uses its tower's post_layernorm
  (it reads layer -2), so a LLaVA checkpoint may carry it untrained or not at all, whereas the CLIP
  checkpoint's was trained together with `visual_projection`.
- The question: each row's user message (`Encoding.messages`, what the prompt style wrote, answer-format
  suffix included), `<image>` a space, as in the reference (`line["text"].replace('<image>', ' ')`). A raw
  prompt (`encode(..., raw_prompts=True)`) is fed whole, template text included. Truncated to the text
  tower's length (77 for CLIP), as the reference.
- Count: `adaptive=false` (default) keeps the top-scoring patches, as many as make the budget together with
  the mean token (at least one), so that methods compare at equal numbers of tokens fed; `adaptive=true`
  keeps the IQR outliers of `s` (the paper's setting, the budget ignored and the count reported).
- `mean_token=true` appends the uniform mean of the unselected patches' pre-projector features, projected.
  It has no patch of its own: `extra_position` says whose position ID it takes (`centroid`: the patch
  nearest the centroid of the unselected patches; `last`: the last patch). The reference feeds it right
  after the kept tokens.
- Emit order: ascending patch index (the latest reference commit), the mean token last.

Deviations: the adaptive count is at least one (the reference's `int(N * outliers / N)` may keep none),
score ties go to the lower index (the reference's `topk` leaves them unspecified), and each row's question
is encoded alone (the reference pads a batch), so that a batch equals its rows run alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

import mllm
from mllm.prompts import image_token
from pruning.methods.prumerge import centroid_patch, iqr_outliers
from pruning.registry import Selection, VisionPruning, register_method, top_k_indices

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def question_text(encoding: mllm.Encoding, row: int, placeholder: str) -> str:
    """Row `row`'s user message (the whole prompt when it was given raw), its image placeholder a space."""
    text = encoding.messages[row] if encoding.messages is not None else encoding.prompts[row]
    return text.replace(placeholder, " ")


def clip_config(directory: Path) -> CLIPConfig:
    """The config of the CLIP checkpoint in `directory`, with errors that name what is wrong."""
    if not directory.is_dir():
        raise ValueError(f"trim: the CLIP checkpoint directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"trim: {directory} has no config.json; clip= must be a local CLIP checkpoint directory")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"trim: {path} is not valid JSON ({error})") from None
    if model_type != "clip":
        raise ValueError(f"trim: {path}: field 'model_type' is {model_type!r}; TRIM needs a full CLIP checkpoint "
                         "('clip': text tower, text_projection and visual_projection)")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"trim: {directory} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return CLIPConfig.from_pretrained(directory, local_files_only=True)


@register_method
class Trim(VisionPruning):
    name = "trim"

    def __init__(self, clip: str = "", sign: str = "negative", adaptive: bool = False, mean_token: bool = True,
                 extra_position: str = "centroid") -> None:
        if not clip:
            raise ValueError("trim scores patches with a CLIP text tower and needs a local CLIP checkpoint (the one "
                             "the LLaVA vision tower came from): pass it as trim:clip=/path/to/clip-dir, e.g. "
                             "trim:clip=/models/clip-vit-large-patch14-336")
        if sign not in ("negative", "positive"):
            raise ValueError(f"trim: sign must be 'negative' (the reference code) or 'positive', got {sign!r}")
        if extra_position not in ("centroid", "last"):
            raise ValueError(f"trim: extra_position must be 'centroid' or 'last', got {extra_position!r}")
        self.clip = str(clip)
        self.sign = sign
        self.adaptive = adaptive
        self.mean_token = mean_token
        self.extra_position = extra_position
        # Checked now, so that a bad path fails before any evaluation run; the weights load on first use.
        self.directory = Path(self.clip).expanduser()
        self.config = clip_config(self.directory)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"trim: {self.directory} has no usable tokenizer ({error})") from None
        self.parts: torch.nn.ModuleDict | None = None

    def encode_options(self, model: mllm.MLLM) -> dict[str, object]:
        self.check_width(model)
        return {"vision_hidden_states": True}

    def check_width(self, model: mllm.MLLM) -> None:
        clip_width = self.config.vision_config.hidden_size
        width = model.adapter.vision_tower.config.hidden_size
        if clip_width != width:
            raise ValueError(f"trim: {self.directory / 'config.json'}: field 'vision_config.hidden_size' is "
                             f"{clip_width}, but the model's vision tower is {width} wide; pass the CLIP checkpoint "
                             "its vision tower came from")

    def clip_parts(self, model: mllm.MLLM) -> torch.nn.ModuleDict:
        """The CLIP modules TRIM uses, loaded once, in fp32 on the model's device."""
        self.check_width(model)
        if self.parts is None:
            clip = CLIPModel.from_pretrained(self.directory, local_files_only=True, dtype=torch.float32)
            # Only these are kept; the vision encoder (most of the checkpoint) is dropped with `clip`.
            self.parts = torch.nn.ModuleDict({
                "text": clip.text_model, "text_projection": clip.text_projection,
                "post_layernorm": clip.vision_model.post_layernorm, "visual_projection": clip.visual_projection,
            }).eval()
        return self.parts.to(model.device)

    @torch.no_grad()
    def text_embedding(self, model: mllm.MLLM, question: str) -> torch.Tensor:
        """(P,) the projected pooled CLIP embedding of `question`, not normalised (as the reference)."""
        parts = self.clip_parts(model)
        length = self.config.text_config.max_position_embeddings
        tokens = self.tokenizer(question, truncation=True, max_length=length, return_tensors="pt").to(model.device)
        pooled = parts["text"](input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return parts["text_projection"](pooled)[0]

    @torch.no_grad()
    def scores(self, model: mllm.MLLM, encoding: mllm.Encoding) -> torch.Tensor:
        """(B, N) fp32: softmax over the patches of -v·t (`sign=negative`) or +v·t."""
        if encoding.vision_hidden_states is None:
            raise ValueError("trim reads the vision tower's hidden states: encode with vision_hidden_states=True "
                             "(method.encode_options(model) says so)")
        parts = self.clip_parts(model)
        features = model.adapter.projector_inputs(encoding.vision_hidden_states).float()
        rows = []
        placeholder = image_token(model.processor)
        for row in range(encoding.batch_size):  # one row at a time, so a batch equals single calls
            text = self.text_embedding(model, question_text(encoding, row, placeholder))
            similarity = parts["visual_projection"](parts["post_layernorm"](features[row])) @ text
            rows.append((similarity if self.sign == "positive" else -similarity).softmax(dim=-1))
        return torch.stack(rows)

    @torch.no_grad()
    def select(self, model: mllm.MLLM, encoding: mllm.Encoding, num_kept: int) -> Selection:
        num_visual = encoding.num_visual
        if num_kept >= num_visual and not self.adaptive:
            return Selection(torch.arange(num_visual).expand(encoding.batch_size, -1))
        scores = self.scores(model, encoding)
        features = model.adapter.projector_inputs(encoding.vision_hidden_states).float()
        kept_rows, means, anchors = [], [], []
        for row in range(encoding.batch_size):
            count = iqr_outliers(scores[row]) if self.adaptive else max(1, num_kept - int(self.mean_token))
            kept = top_k_indices(scores[row][None], count)[0].sort().values
            kept_rows.append(kept.cpu())
            unselected = torch.ones(num_visual, dtype=torch.bool, device=kept.device)
            unselected[kept] = False
            dropped = unselected.nonzero()[:, 0]
            if self.mean_token and len(dropped):
                means.append(features[row, dropped].mean(dim=0))
                uniform = torch.ones(len(dropped))
                anchors.append(centroid_patch(dropped.cpu(), uniform, encoding.grid)
                               if self.extra_position == "centroid" else num_visual - 1)
        extra = anchor_tensor = None
        if means and len(means) == encoding.batch_size:
            extra = model.adapter.project(torch.stack(means)[:, None].to(encoding.inputs_embeds.dtype))
            anchor_tensor = torch.tensor(anchors)[:, None]
        return Selection(kept_rows, extra=extra, extra_anchors=anchor_tensor)
