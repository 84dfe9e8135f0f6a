"""What the tiling option adds to a training step's floating-point operations, counted, at real model widths.

    python -m benchmarks.tiling_flops    # writes benchmarks/results/tiling_flops.md

``benchmarks.tiling`` times tiling on this CPU's narrow Flux (width 256), where a step's time is
more than its matrix products: the elementwise work tiling redoes (normalizations made again, the
activation of each chunk's hidden layer) weighs as much there. What tiling costs a real model on a
GPU is mostly the matrix products it redoes, and those depend on the model's width, which a CPU
cannot run at a useful length. So this counts them instead (``torch.utils.flop_counter``'s
formulas: every matrix product and attention kernel of one forward and backward, recomputes
included) on the meta device, where a step is shapes alone: Flux.1 and Wan2.1-T2V-14B at their
own configs (one double- and two single-stream blocks, Flux's ratio; one Wan block), and the CPU
benchmark's Flux for comparison, with tiling on and off, with and without gradient checkpointing; and
both real models again as a LoRA fine-tune trains them (a frozen base, rank-``LORA_RANK`` adapters on
the attention and MLP layers), where the untiled step takes no gradient of the base's weights.
The counts are exact; what they leave out (elementwise work, memory traffic, launch overhead) is
what a GPU timing would add.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from torch.utils.flop_counter import flop_registry

from benchmarks.provenance import describe
from benchmarks.worker import LORA, TEXT_TOKENS, WIDE_FLUX
from cp_plugin.compat import TorchDispatchMode
from cp_plugin.memory import apply_memory_options
from cp_plugin.model import Conversion
from recipe.lora import LoraSettings, add_lora

OUT = Path("benchmarks/results/tiling_flops.md")
PROMPT = 512  # text tokens of the real models' prompts (T5's length in Flux and Wan)
LORA_RANK = 32
# The layers a LoRA fine-tune adapts: the benchmarks' (attention's, and Flux's MLPs'), and Wan's feed-forward networks.
LORA_TARGETS = [*LORA.target_modules, "ffn.net.0.proj", "ffn.net.2"]
FRAME = 32 * 32  # Wan's tokens per latent frame here (a 64 x 64 latent in 2 x 2 patches)


def flux_step(config: dict, text: int) -> Callable[[torch.nn.Module, int], torch.Tensor]:
    """A function making Flux's output at ``tokens`` image tokens (meta tensors), for the model's config."""
    def forward(model: torch.nn.Module, tokens: int) -> torch.Tensor:
        with torch.device("meta"):
            inputs = {"hidden_states": torch.empty(1, tokens, config["in_channels"]),
                      "encoder_hidden_states": torch.empty(1, text, config["joint_attention_dim"]),
                      "pooled_projections": torch.empty(1, config["pooled_projection_dim"]), "timestep": torch.empty(1)}
        # positions stay real: the rotary table is computed from their values
        return model(**inputs, img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3)).sample
    return forward


def wan_step(model: torch.nn.Module, tokens: int) -> torch.Tensor:
    """Wan's output at ``tokens`` video tokens: frames of ``FRAME`` tokens each."""
    config = model.config
    with torch.device("meta"):
        inputs = {"hidden_states": torch.empty(1, config.in_channels, tokens // FRAME, 64, 64),
                  "timestep": torch.empty(1), "encoder_hidden_states": torch.empty(1, PROMPT, config.text_dim)}
    return model(**inputs).sample


class FlopCount(TorchDispatchMode):
    """The operations of every op that ``torch.utils.flop_counter`` has a formula for, summed. Not its
    ``FlopCounterMode``: that tracks modules with global forward hooks, and the tiling option leaves a layer that
    such a hook watches as it is (skipping or rerunning its forward would skip or rerun the hook), so under it
    Flux's inline MLPs would not be tiled and their cost not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted(model: torch.nn.Module, forward: Callable, tokens: int, checkpointing: bool, tiling: bool) -> int:
    """Floating-point operations of one forward and backward with the options on."""
    return counted_with(model, forward, tokens, functools.partial(
        apply_memory_options, gradient_checkpointing=checkpointing, tiling=tiling, tile_tokens=None))


def counted_with(model: torch.nn.Module, forward: Callable, tokens: int,
                 apply: Callable[[torch.nn.Module], Conversion]) -> int:
    """Floating-point operations of one forward and backward with the options ``apply`` puts on (and are undone)."""
    options = apply(model)
    try:
        with FlopCount() as counter:
            forward(model, tokens).float().square().mean().backward()
    finally:
        options.remove()
        model.zero_grad(set_to_none=True)
    return counter.total


def models() -> list[tuple[str, torch.nn.Module, Callable, tuple[int, ...]]]:
    """(name, model on the meta device, its forward, token counts) for each model counted."""
    with torch.device("meta"):  # diffusers' defaults are Flux.1's and Wan2.1-T2V-14B's configs
        real_flux = FluxTransformer2DModel(num_layers=1, num_single_layers=2)
        wan = WanTransformer3DModel(num_layers=1)
        narrow = FluxTransformer2DModel(**WIDE_FLUX, num_layers=2, num_single_layers=2)
        lora_flux = FluxTransformer2DModel(num_layers=1, num_single_layers=2)
        lora_wan = WanTransformer3DModel(num_layers=1)
        for model in (lora_flux, lora_wan):
            add_lora(model, LoraSettings(rank=LORA_RANK, target_modules=LORA_TARGETS))
    lengths = (4096, 16384, 65536, 131072)
    return [
        (f"Flux.1 (width {real_flux.inner_dim}, 1 double + 2 single blocks, {PROMPT} text tokens)", real_flux,
         flux_step(dict(real_flux.config), PROMPT), lengths),
        (f"Wan2.1-T2V-14B (width {wan.config.num_attention_heads * wan.config.attention_head_dim}, 1 block, "
         f"{PROMPT} text tokens)", wan, wan_step, lengths),
        (f"benchmarks.tiling's Flux (width {narrow.inner_dim}, 2 + 2 blocks, {TEXT_TOKENS} text tokens)", narrow,
         flux_step(dict(narrow.config), TEXT_TOKENS), (4096, 9216)),
        (f"Flux.1 as above, LoRA rank {LORA_RANK} (frozen base)", lora_flux, flux_step(dict(lora_flux.config), PROMPT),
         lengths),
        (f"Wan2.1-T2V-14B as above, LoRA rank {LORA_RANK} (frozen base)", lora_wan, wan_step, lengths),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    command = ("python -m benchmarks.tiling_flops " + " ".join(sys.argv[1:])).strip()
    lines = ["# Tiling's cost in floating-point operations, counted at real model widths", "",
             f"{describe(command)} Operations of one forward and backward (torch.utils.flop_counter's formulas, "
             "on the meta device: matrix products and attention, recomputes included; elementwise work not "
             "counted), with the tiling option (`tile_feed_forward=True`, chunks chosen per call) over without, "
             "at the same options otherwise.", "",
             "| model | tokens | TFLOP, untiled | tiled / untiled | TFLOP, checkpointed | tiled / untiled, "
             "checkpointed |", "|---|---|---|---|---|---|"]
    for name, model, forward, lengths in models():
        for tokens in lengths:
            row = [name, str(tokens)]
            for checkpointing in (False, True):
                untiled = counted(model, forward, tokens, checkpointing, tiling=False)
                tiled = counted(model, forward, tokens, checkpointing, tiling=True)
                row += [f"{untiled / 1e12:.2f}", f"{tiled / untiled:.3f}"]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
