"""Vision-tower activations through hooks, on any model `mllm` loads: TransformerLens' `TransformerBridge`
where it has an adapter for the architecture (LLaVA, Qwen2.5-VL), plain transformers forward hooks on the
tower's blocks where it has none (Qwen2-VL in TransformerLens 4.3).

TransformerLens wraps a model by replacing its submodules in place and switching it to eager
attention. To make no permanent edits, the bridge is booted on a *shell* of the model: new module
objects that share the original's parameters and buffers (no memory is copied), with their own
configs. The model `mllm` loaded is never touched, and hooks live only for one call.

Layer k is what transformers' `output_hidden_states[k]` holds: layer 0 is the input of the first
block (embeddings, after CLIP's pre-LayerNorm), layer k >= 1 the output of block k - 1. States come
back in the adapter's representation: (B, T, D) for LLaVA (CLS first); for Qwen2-VL / Qwen2.5-VL a list
of per-image (rows, cols, D) patch grids in raster order, moved out of the order the tower's blocks
process them (merge blocks; windows on Qwen2.5-VL) by the adapter's `raster_patch_states`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence

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
    """While booting, TransformerLens' torchvision installer does nothing, and its adapters do not demand torchvision.

    When a checkpoint's AutoProcessor fails to load, TransformerLens 4 runs `pip install torchvision`
    and retries. The bridge never needs TransformerLens' processor (it gets `mllm`'s), so the
    failure is left as it is and nothing is installed. For the same reason its Qwen2.5-VL adapter's
    `required_libraries = ["torchvision"]` (for that processor) is not checked while booting; every other
    library an adapter requires still is.
    """
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources.transformers import helpers

    installer = helpers._ensure_torchvision
    check = ArchitectureAdapter._check_required_libraries

    def check_all_but_torchvision(adapter: ArchitectureAdapter) -> None:
        adapter.required_libraries = [name for name in type(adapter).required_libraries if name != "torchvision"]
        try:
            check(adapter)
        finally:
            del adapter.required_libraries

    helpers._ensure_torchvision = _never_install
    ArchitectureAdapter._check_required_libraries = check_all_but_torchvision
    try:
        yield
    finally:
        helpers._ensure_torchvision = installer
        ArchitectureAdapter._check_required_libraries = check


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


def transformer_lens_supports(mllm: MLLM) -> bool:
    """Whether TransformerLens has a bridge adapter for `mllm`'s architecture (checked by name, nothing booted)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return type(mllm.model).__name__ in SUPPORTED_ARCHITECTURES


def vision_batch(inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> Mapping[str, torch.Tensor]:
    """A processor batch ({"pixel_values"[, "image_grid_thw"]}); a bare tensor is a fixed-size model's pixel_values."""
    return {"pixel_values": inputs} if isinstance(inputs, torch.Tensor) else inputs


def tower_call(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(pixel_values, keyword arguments): how the vision tower is called on a processor batch."""
    return batch["pixel_values"], ({"grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {})


def flat_state(state: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A hidden state as one tensor: itself, or its per-image grids' rows one after another."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat([part.reshape(-1, part.shape[-1]) for part in state])


class VisionHooks:
    """Read chosen vision-tower layers of `mllm` through hooks (`backend`: "transformer_lens" or "transformers").

        hooks = VisionHooks(mllm)
        batch, _ = encode_vision_inputs(mllm, images)   # from mllm.encoding
        states = hooks.run(batch, layers=[0, 12, 23])   # {layer: the adapter's hidden-state representation}
    """

    def __init__(self, mllm: MLLM, backend: str | None = None) -> None:
        self.mllm = mllm
        self.backend = backend or ("transformer_lens" if transformer_lens_supports(mllm) else "transformers")
        if self.backend == "transformer_lens":
            self.bridge = boot_bridge(mllm)
            encoder = getattr(self.bridge, "vision_encoder", None)
            if encoder is None:
                raise NotImplementedError(f"{mllm.path}: TransformerLens exposes no `vision_encoder` for this model")
            self.encoder = encoder
            names = [name for name in _BLOCK_LISTS if isinstance(getattr(encoder, name, None), nn.ModuleList)]
            if not names:
                raise NotImplementedError(f"{mllm.path}: TransformerLens' {type(encoder).__name__} has no list of "
                                          "blocks")
            self.block_list = f"vision_encoder.{names[0]}"
            self.num_blocks = len(getattr(encoder, names[0]))
        elif self.backend == "transformers":
            self.bridge = None
            blocks = mllm.adapter.vision_layers
            self.block_list = next(name for name, module in mllm.model.named_modules() if module is blocks)
            self.num_blocks = len(blocks)
        else:
            raise ValueError(f"unknown hook backend {self.backend!r}; choose 'transformer_lens' or 'transformers'")

    @property
    def num_layers(self) -> int:
        """Hidden states per image: the embeddings plus one per block."""
        return self.num_blocks + 1

    def hook_name(self, layer: int) -> str:
        """The hook that carries hidden state `layer`: TransformerLens' block `hook_in` / `hook_out`, or, with
        transformers hooks, the block's module name with `.hook_in` / `.hook_out` (its input / output)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range: this vision tower has layers 0..{self.num_blocks}")
        block, point = (0, "hook_in") if layer == 0 else (layer - 1, "hook_out")
        return f"{self.block_list}.{block}.{point}"

    @torch.no_grad()
    def run(self, batch: Mapping[str, torch.Tensor] | torch.Tensor, layers: Sequence[int]) -> dict[int, object]:
        """{layer: hidden state} for one forward pass of the vision tower on a processor batch (or LLaVA's bare
        pixel_values); hooks are removed after. States come in the order the tower's blocks see them and are
        handed back in the adapter's representation (see the module docstring)."""
        batch = vision_batch(batch)
        names = {layer: self.hook_name(layer) for layer in layers}
        pixel_values, options = tower_call(batch)
        pixel_values = pixel_values.to(self.mllm.device, self.mllm.dtype)
        captured = (self._run_transformer_lens if self.bridge is not None else self._run_transformers)(
            pixel_values, options, set(names.values()))
        states = {layer: captured[name] for layer, name in names.items()}
        if "image_grid_thw" in batch:  # one flat sequence of every image's patches
            states = {layer: self.mllm.adapter.raster_patch_states(state, batch["image_grid_thw"])
                      for layer, state in states.items()}
        return states

    def _run_transformer_lens(self, pixel_values: torch.Tensor, options: dict,
                              names: set[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, hook: object) -> torch.Tensor:
            captured[hook.name] = tensor.detach()
            return tensor

        with self.bridge.hooks(fwd_hooks=[(name, keep) for name in names]):
            self.encoder(pixel_values, **options)
        return captured

    def _run_transformers(self, pixel_values: torch.Tensor, options: dict, names: set[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        blocks = self.mllm.adapter.vision_layers
        handles = []

        def block_input(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[name] = (args[0] if args else kwargs["hidden_states"]).detach()
            return hook

        def block_output(name: str):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                captured[name] = (output[0] if isinstance(output, tuple) else output).detach()
            return hook

        try:
            for name in names:
                index, point = name.removeprefix(f"{self.block_list}.").split(".")
                block = blocks[int(index)]
                if point == "hook_in":
                    handles.append(block.register_forward_pre_hook(block_input(name), with_kwargs=True))
                else:
                    handles.append(block.register_forward_hook(block_output(name)))
            self.mllm.adapter.vision_tower(pixel_values, **options)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    @torch.no_grad()
    def max_difference_from_transformers(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> float:
        """Largest |hook - output_hidden_states| over every layer, relative to the layer's largest |value|."""
        batch = vision_batch(batch)
        reference = self.mllm.adapter.tower_hidden_states(batch)
        hooked = self.run(batch, range(self.num_layers))
        worst = 0.0
        if len(reference) != self.num_layers:
            raise RuntimeError(f"transformers gives {len(reference)} hidden states, the hooks {self.num_layers}")
        for layer, expected in enumerate(reference):
            got, want = flat_state(hooked[layer]).float(), flat_state(expected).float()
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-12)))
        return worst
