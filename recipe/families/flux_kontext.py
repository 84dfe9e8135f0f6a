"""Flux Kontext (FluxKontextPipeline): image editing, Flux with the reference image's tokens after the target's.

Everything but the reference is Flux's: the same VAE normalisation, 2x2 packing, prompts and
guidance. The reference image's latents are packed like the target's and appended to the sequence,
their position ids marked ``1`` in the first (index) axis, as ``FluxKontextPipeline.prepare_latents``
does; the loss reads only the target's tokens (``noise_pred[:, : latents.size(1)]``). Context
parallelism splits the whole joint sequence, reference tokens included, like any other image tokens.
The recipe fits each reference to its sample's bucket, and validation passes it at the sample size
(``_auto_resize=False``, ``max_area`` of that size), so training and sampling see references of the same size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin

from recipe.families.flux import Flux, flux_ids


class FluxKontext(Flux):
    name, title = "flux_kontext", "Flux Kontext"
    pipeline_class_name, task = "FluxKontextPipeline", "edit"

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        return 2 * super().tokens(transformer, latent_shape)  # the target's and the reference's (same bucket)

    def call(self, transformer: ModelMixin, tokens: torch.Tensor, grid: tuple[int, int], t: torch.Tensor,
             text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        if "reference_latents" not in text:  # no reference: Kontext generates from the prompt alone, as Flux
            return super().call(transformer, tokens, grid, t, text, guidance)
        reference, reference_grid = self.image_tokens(transformer, text["reference_latents"][:, 0].to(tokens.dtype))
        reference_ids = flux_ids(*reference_grid, tokens.device)
        reference_ids[:, 0] = 1
        ids = torch.cat([flux_ids(*grid, tokens.device), reference_ids])
        out = self.run(transformer, torch.cat([tokens, reference], 1), ids, t, text, guidance)
        return out[:, : tokens.shape[1]]

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {**super().text_dims(transformer), "reference_latents": None}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        # the pipeline sizes its output by max_area (1024^2 unless given), not by height and width alone
        return {"image": image.resize((width, height)), "_auto_resize": False, "max_area": height * width}
