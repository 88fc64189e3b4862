"""Vision-tower activations through TransformerLens' `TransformerBridge` hooks, on any model `mllm` loads.

TransformerLens wraps a model by replacing its submodules in place and switching it to eager
attention. To make no permanent edits, the bridge is booted on a *shell* of the model: new module
objects that share the original's parameters and buffers (no memory is copied), with their own
configs. The model `mllm` loaded is never touched, and hooks live only for one call.

Layer k is what transformers' `output_hidden_states[k]` holds: layer 0 is the input of the first
block (embeddings, after CLIP's pre-LayerNorm), layer k >= 1 the output of block k - 1.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mllm import MLLM

# TransformerLens names a vision tower's list of blocks differently per bridge class.
_BLOCK_LISTS = ("encoder_layers", "blocks", "layers")


def _never_install() -> bool:
    """Stands in for TransformerLens' torchvision installer: report "not available", run no pip."""
    return False


@contextlib.contextmanager
def _no_runtime_installs() -> Iterator[None]:
    """While booting, TransformerLens' torchvision installer does nothing.

    When a checkpoint's AutoProcessor fails to load, TransformerLens 4 runs `pip install torchvision`
    and retries. The bridge never needs TransformerLens' processor (it gets `mllm`'s), so the
    failure is left as it is and nothing is installed.
    """
    from transformer_lens.model_bridge.sources.transformers import helpers

    original = helpers._ensure_torchvision
    helpers._ensure_torchvision = _never_install
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def shell_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree with new module objects and configs but the same parameter tensors."""
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._modules = {name: shell_copy(child) if child is not None else None for name, child in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    if "config" in module.__dict__:
        new.config = copy.deepcopy(module.config)
    return new


def boot_bridge(mllm: MLLM) -> object:
    """A `TransformerBridge` over a shell of `mllm.model` (see the module docstring); never installs anything."""
    from transformer_lens.model_bridge import TransformerBridge

    with _no_runtime_installs():
        bridge = TransformerBridge.boot_transformers(
            str(mllm.path), hf_model=shell_copy(mllm.model), tokenizer=copy.deepcopy(mllm.tokenizer),
            device=mllm.device, dtype=mllm.dtype,
        )
    bridge.processor = mllm.processor
    return bridge


class VisionHooks:
    """Read chosen vision-tower layers of `mllm` through TransformerLens hooks.

        hooks = VisionHooks(mllm)
        states = hooks.run(pixel_values, layers=[0, 12, 23])   # {layer: (B, T, D)}, CLS included
    """

    def __init__(self, mllm: MLLM) -> None:
        self.mllm = mllm
        self.bridge = boot_bridge(mllm)
        encoder = getattr(self.bridge, "vision_encoder", None)
        if encoder is None:
            raise NotImplementedError(f"{mllm.path}: TransformerLens exposes no `vision_encoder` for this model")
        self.encoder = encoder
        names = [name for name in _BLOCK_LISTS if isinstance(getattr(encoder, name, None), nn.ModuleList)]
        if not names:
            raise NotImplementedError(f"{mllm.path}: TransformerLens' {type(encoder).__name__} has no list of blocks")
        self.block_list = names[0]
        self.num_blocks = len(getattr(encoder, self.block_list))

    @property
    def num_layers(self) -> int:
        """Hidden states per image: the embeddings plus one per block."""
        return self.num_blocks + 1

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook that carries hidden state `layer` (its `hook_resid_pre` / `hook_resid_post`)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range: this vision tower has layers 0..{self.num_blocks}")
        block, point = (0, "hook_in") if layer == 0 else (layer - 1, "hook_out")
        return f"vision_encoder.{self.block_list}.{block}.{point}"

    @torch.no_grad()
    def run(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: (B, T, D) hidden state} for one forward pass of the vision tower; hooks are removed after."""
        captured: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, hook: object) -> torch.Tensor:
            captured[hook.name] = tensor.detach()
            return tensor

        names = {layer: self.hook_name(layer) for layer in layers}
        with self.bridge.hooks(fwd_hooks=[(name, keep) for name in set(names.values())]):
            self.encoder(pixel_values.to(self.mllm.device, self.mllm.dtype))
        return {layer: captured[name] for layer, name in names.items()}

    @torch.no_grad()
    def max_difference_from_transformers(self, pixel_values: torch.Tensor) -> float:
        """Largest |hook - output_hidden_states| over every layer, relative to the layer's largest |value|."""
        _, reference = self.mllm.adapter.image_features(pixel_values, output_hidden_states=True)
        hooked = self.run(pixel_values, range(self.num_layers))
        worst = 0.0
        if len(reference) != self.num_layers:
            raise RuntimeError(f"transformers gives {len(reference)} hidden states, the bridge {self.num_layers}")
        for layer, expected in enumerate(reference):
            got, want = hooked[layer].float(), expected.float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-12)))
        return worst
