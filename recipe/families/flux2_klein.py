"""Flux.2 Klein (Flux2KleinPipeline): Flux.2's latents, ids and transformer, Qwen3 prompts, no embedded guidance.

Everything but the prompt and the guidance is Flux.2's (:mod:`recipe.families.flux2`): the same VAE
and normalisation, the same transformer class and position ids. The prompt is the pipeline's
``encode_prompt``: the user's prompt through the tokenizer's chat template (generation prompt
opened, thinking off), padded to 512 tokens, and Qwen3's hidden states at layers 9, 18 and 27 side by
side per token, all 512 attended (no mask). The transformer takes no guidance (``guidance=None``: the
Klein models have no guidance embedding); the pipeline's classifier-free guidance is two calls of it
at sampling, so training fits the conditional velocity alone.
"""

from __future__ import annotations

from typing import Any

import torch

from recipe.families.flux2 import TINY_FLUX2, Flux2

# The demo model (no pretrained weights): Flux.2's, without the guidance embedding, as the Klein models are built.
TINY_FLUX2_KLEIN: dict[str, Any] = {**TINY_FLUX2, "guidance_embeds": False}


class Flux2Klein(Flux2):
    name, title, tiny_config = "flux2_klein", "Flux.2 Klein", TINY_FLUX2_KLEIN
    pipeline_class_name = "Flux2KleinPipeline"

    def guidance(self, t: torch.Tensor, scale: float) -> torch.Tensor | None:
        return None  # Flux2KleinPipeline's loop passes guidance=None
