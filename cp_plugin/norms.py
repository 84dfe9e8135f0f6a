"""Normalization layers recomputed in the backward instead of saving their normalized output.

A DiT block normalizes its tokens several times, and each normalization keeps a tensor of the block's
width for the backward beyond its input: an RMS norm of queries or keys keeps ``x / rms(x)`` for its
weight's gradient (``torch.nn.RMSNorm`` and diffusers' ``RMSNorm`` outside a fused kernel), and an
adaptive layer norm keeps ``norm(x)`` for the gradient of the scale it multiplies by. Under
checkpointing a block's recompute holds all of them at once: at long sequences they are a fifth of
the peak. Recomputing a normalization costs one elementwise pass over its input, so each of these
layers runs under ``torch.utils.checkpoint`` (nested in the block's own checkpoint where there is
one): it keeps only its inputs, which the layers before and after it keep anyway, and the same ops
run again in the backward, so the gradients are those of the untouched layer. Layers are found by
class (the normalizations above, whose forward reads each token alone); one another hook wraps
(a context-parallel split or gather) is left as it is, so a recompute never communicates.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models import normalization
from torch.utils.checkpoint import checkpoint

from cp_plugin.compat import forward_is_hooked_only_by, is_symbolic
from cp_plugin.model import Conversion, hook_name
from cp_plugin.tiling import INLINE_MLP_BLOCK, MIN_TILED_TOKENS

# Normalizations that save a normalized tensor of their input's size for their weight's or modulation's gradient.
RECOMPUTED_NORMS = (
    torch.nn.RMSNorm, normalization.RMSNorm, normalization.MochiRMSNorm, normalization.AdaLayerNorm,
    normalization.AdaLayerNormZero, normalization.AdaLayerNormZeroSingle, normalization.AdaLayerNormContinuous,
    normalization.SD35AdaLayerNormZeroX, normalization.LuminaRMSNormZero, normalization.LuminaLayerNormContinuous,
    normalization.CogView3PlusAdaLayerNormZeroTextImage, normalization.CogVideoXLayerNormZero,
)


RECOMPUTED_NORM = "recomputed_norm"
# The hooks a recomputed norm may run inside: its own, and tiling's over an adaptive norm's ``linear(silu(emb))``.
RUNS_UNDER = frozenset({hook_name(RECOMPUTED_NORM), hook_name(INLINE_MLP_BLOCK)})


class RecomputedNorm(ModelHook):
    """Runs a normalization layer under a non-reentrant checkpoint where gradients are recorded for enough tokens."""

    def __init__(self, rows: int | None) -> None:
        super().__init__()
        self.rows = rows

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
        if (x is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or is_symbolic(x)
                or not forward_is_hooked_only_by(module, RUNS_UNDER)
                or x.shape[:-1].numel() < (MIN_TILED_TOKENS if self.rows is None else self.rows)):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def recompute_norms(module: torch.nn.Module, conversion: Conversion, rows: int | None = None) -> None:
    """Hook every normalization layer of :data:`RECOMPUTED_NORMS` in ``module`` into ``conversion`` (undone by its
    ``remove()``); ``rows``: the tokens from which a call is recomputed (``None``: ``MIN_TILED_TOKENS``)."""
    hooked: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, RECOMPUTED_NORMS) and not any(name.startswith(f"{outer}.") for outer in hooked):
            conversion.hook(sub, RecomputedNorm(rows), RECOMPUTED_NORM)
            hooked.append(name)  # a norm inside it is recomputed with it
