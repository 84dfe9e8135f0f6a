"""Uneven sequences: pad to a multiple of the CP size, mask the padding out of attention, trim it off.

Users train on mixed resolutions and durations, so a sequence is often not a multiple of the CP
size (1001 tokens on 2 ranks). The split hooks pad such a sequence at its end to the next multiple
of cp, so only the last ranks hold padding. Attention must not attend to it: every
context-parallel attention call asks :meth:`SequencePadding.key_mask` for this rank's key-padding
mask, which Ulysses and the ring carry along with the keys, forward and backward. Padded *queries*
give rows nobody reads: the output gather trims them off, so the loss and every gradient are those
of the unpadded sequence, exactly (the padded rows receive zero gradient).

One sequence per forward may be padded: the image/video tokens (``hidden_states`` and what is
split alongside it: position ids, RoPE tables, per-token timesteps). diffusers' joint attention
(Flux, QwenImage, ...) puts text tokens *before* image tokens, so a key sequence longer than the
local image shard is read as text followed by image. Text inputs are never padded: they must
divide the CP size, and an error says so, because a padded text block would sit in the middle of
the joint sequence.

The state lives for one forward of one model: a hook at the model's entry resets it, and it stays
until the next forward so that activation checkpointing recomputes blocks with the same mask (run
a forward's backward before the model's next forward, as training does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_INPUTS = ("encoder_hidden_states", "txt_ids")


def is_text_input(name: object) -> bool:
    """Whether a ``_cp_plan`` input holds text tokens (diffusers' names: ``encoder_hidden_states*``, ``txt_*``)."""
    return isinstance(name, str) and name.startswith(TEXT_INPUTS)


@dataclass
class SequencePadding:
    """The sequence padded in the current forward of one model, and this rank's place in the CP group."""

    cp_size: int
    cp_rank: int
    length: int | None = None  # unpadded length; None: nothing padded in this forward
    padded: int | None = None

    def reset(self) -> None:
        self.length = self.padded = None

    def pad(self, x: torch.Tensor, dim: int, name: object, where: str) -> torch.Tensor:
        """``x`` padded with zeros along ``dim`` to a multiple of cp (unchanged if cp divides it)."""
        length = x.size(dim)
        if length % self.cp_size == 0:
            return x
        multiple = length + self.cp_size - length % self.cp_size
        if is_text_input(name):
            raise ValueError(
                f"{name} has {length} tokens (dim {dim} of a {tuple(x.shape)} input to {where}), which the "
                f"context-parallel size {self.cp_size} (ring_degree x ulysses_degree) does not divide; only image/"
                f"video tokens are padded, so pad the text to a multiple of {self.cp_size} (e.g. {multiple} tokens, "
                "with its attention mask) or use a cp size that divides it"
            )
        if self.length not in (None, length):
            raise ValueError(
                f"two sequences of {self.length} and {length} tokens in one forward of {where} are not divisible by "
                f"the context-parallel size {self.cp_size}; only the image/video sequence is padded, so make the "
                f"other (text) sequence a multiple of {self.cp_size}"
            )
        self.length, self.padded = length, multiple
        shape = list(x.shape)
        shape[dim] = multiple - length
        return torch.cat([x, x.new_zeros(shape)], dim)

    def check_image_length(self, x: torch.Tensor, dim: int, name: object, where: str) -> None:
        """``hidden_states`` is the image sequence: if something else was padded, it was not image tokens."""
        if name == "hidden_states" and self.length is not None and x.size(dim) not in (self.length, self.padded):
            raise ValueError(
                f"a sequence of {self.length} tokens split before {name} ({x.size(dim)} tokens) in {where} is not "
                f"divisible by the context-parallel size {self.cp_size}; only the image/video sequence is padded, "
                f"so make the text sequence a multiple of {self.cp_size}"
            )

    def key_mask(self, keys: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """This rank's key-padding mask ``(batch, keys)`` (True = attend), or None if nothing is padded.

        The local keys are ``keys - local`` text tokens (none in self-attention) followed by this
        rank's ``local`` image tokens, whose tail is padding on the last ranks.
        """
        if self.length is None or self.padded is None:
            return None
        local = self.padded // self.cp_size
        if keys < local:
            raise ValueError(
                f"context-parallel attention got {keys} keys per rank, fewer than the {local} image tokens per rank; "
                "cp_plugin pads only self- or joint (text first) attention over the image sequence"
            )
        valid = min(max(self.length - self.cp_rank * local, 0), local)
        return (torch.arange(keys, device=device) < keys - local + valid).expand(batch, keys)

    def trim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A gathered full sequence without its padding."""
        if self.length is None or x.size(dim) != self.padded:
            return x
        return x.narrow(dim, 0, self.length)
