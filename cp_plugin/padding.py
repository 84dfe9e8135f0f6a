"""Uneven sequences: pad to a multiple of the CP size, mask the padding out of attention, trim it off.

Users train on mixed resolutions and durations, and pipelines trim prompts to their real length,
so a sequence is often not a multiple of the CP size (1001 image tokens, or 7 text tokens, on 2
ranks). The split hooks pad every sequence they split at its end to the next multiple of cp, so
only the last ranks hold padding. Attention must not attend to it: every context-parallel
attention call asks :meth:`SequencePadding.key_mask` for this rank's key-padding mask, which
Ulysses and the ring carry along with the keys, forward and backward. Padded *queries* give rows
nobody reads: the output gather trims them off, so the loss and every gradient are those of the
unpadded sequences, exactly (the padded rows receive zero gradient).

Two sequences may be split in one forward: the image/video tokens (``hidden_states`` and what is
split alongside it: position ids, RoPE tables, per-token timesteps) and the text tokens
(``encoder_hidden_states*``, ``txt_*``, the text mask) when a plan splits them. Inputs a plan
names by output index (a RoPE module's outputs) are matched to a sequence by length. The local
keys of an attention call are then the local image tokens (self-attention), the local text tokens
(cross-attention to split text) or both, in the order the processor concatenates them (text first
in Flux, image first in SD3; the attention routing finds out, see ``attention/dispatch.py``); an
attention module given ``encoder_hidden_states`` settles the one ambiguous case (equal local text
and image lengths). Where text and image would get equal local lengths from different lengths, the
text gets one more padded token per rank, so that a local length always names its sequence.

The state lives for one forward of one model: a hook at the model's entry resets it, and it stays
until the next forward so that activation checkpointing recomputes blocks with the same mask (run
a forward's backward before the model's next forward, as training does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TEXT_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "txt_")


def is_text_input(name: object) -> bool:
    """Whether a ``_cp_plan`` input holds text tokens (diffusers' names: ``encoder_hidden_states*``, ``txt_*``, ...)."""
    return isinstance(name, str) and name.startswith(TEXT_INPUTS)


@dataclass
class SequencePadding:
    """The sequences split in the current forward of one model, and this rank's place in the CP group."""

    cp_size: int
    cp_rank: int
    image_length: int | None = None  # unpadded lengths of the sequences split in this forward
    text_length: int | None = None
    lengths: set[int] = field(default_factory=set)  # every split length, named or matched later
    attending_text: bool = False  # the running attention module was given encoder_hidden_states
    joint_order: str | None = None  # "text_first" / "image_first" once known (it is the model's, kept)
    in_blocks: int = 0  # > 0 while a block of a derived plan runs (its attention calls are routed)
    text_extra: int = 0  # one more token per rank for text that would tie with the image (set on registration)

    def reset(self) -> None:
        self.image_length = self.text_length = None
        self.lengths = set()
        self.text_extra = self.in_blocks = 0

    def padded(self, length: int) -> int:
        """``length`` padded to a multiple of the CP size (text one block more where it would tie with the image)."""
        rounded = -(-length // self.cp_size) * self.cp_size
        return rounded + self.text_extra if length == self.text_length and length != self.image_length else rounded

    def local_length(self, length: int) -> int:
        """This rank's share of a split ``length``-token sequence, padding included."""
        return self.padded(length) // self.cp_size

    def local_lengths(self) -> set[int]:
        """What a local token count can be in this forward: this rank's image tokens, text tokens, or both."""
        if self.image_length is None:
            return set()
        image = self.local_length(self.image_length)
        if self.text_length is None:
            return {image}
        text = self.local_length(self.text_length)
        return {image, text, image + text}

    def register(self, kind: str, length: int, where: str) -> None:
        """Note that the ``kind`` ("image" or "text") sequence of ``length`` tokens is split in this forward."""
        known = getattr(self, f"{kind}_length")
        if known not in (None, length):
            raise ValueError(
                f"two {kind} sequences of {known} and {length} tokens were split in one forward of {where}; cp_plugin "
                "pads one image/video and one text sequence per forward. Split inputs of the same kind must have "
                "the same length"
            )
        if kind == "text" and known is None and self.image_length not in (None, length):
            # Decided once, when the text is split after the image (every plan splits the image first).
            self.text_extra = self.cp_size if self.padded(length) == self.padded(self.image_length) else 0
        setattr(self, f"{kind}_length", length)
        self.lengths.add(length)

    def pad_to_split(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        """``x`` (``length`` tokens along ``dim``) padded with zeros (False) to :meth:`padded` ``(length)``."""
        extra = self.padded(length) - length
        if not extra:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_zeros(shape)], dim)

    def pad(self, x: torch.Tensor, dim: int, name: object, where: str) -> torch.Tensor:
        """``x`` padded with zeros along ``dim`` to a multiple of cp (unchanged if cp divides it)."""
        length = x.size(dim)
        kind = "text" if is_text_input(name) else "image" if name == "hidden_states" else None
        if kind is not None:
            self.register(kind, length, f"{where} ('{name}')")
        self.lengths.add(length)
        return self.pad_to_split(x, dim, length)

    def _local_valid(self, length: int, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, padded / cp)``: which of this rank's tokens of a ``length``-token sequence are real."""
        local = self.local_length(length)
        valid = min(max(length - self.cp_rank * local, 0), local)
        return (torch.arange(local, device=device) < valid).expand(batch, local)

    def key_mask(
        self, keys: int, batch: int, device: torch.device, joint_order: Callable[[], str] = lambda: "text_first"
    ) -> torch.Tensor | None:
        """This rank's key-padding mask ``(batch, keys)`` (True = attend), or None if no key is padding.

        The local keys are the local image tokens, the local text tokens, or both in the order
        ``joint_order()`` gives (asked only then; diffusers' own plans split text-first models).
        """
        if all(self.padded(length) == length for length in self.lengths):
            return None
        image, text = self.image_length, self.text_length
        image_local = None if image is None else self.local_length(image)
        text_local = None if text is None else self.local_length(text)
        if image_local == keys and not (self.attending_text and text_local == keys):
            return self._local_valid(image, batch, device)
        if text_local == keys:
            return self._local_valid(text, batch, device)
        if image_local is not None and text_local is not None and keys == text_local + image_local:
            parts = [self._local_valid(text, batch, device), self._local_valid(image, batch, device)]
            return torch.cat(parts[::-1] if joint_order() == "image_first" else parts, 1)
        raise ValueError(
            f"context-parallel attention got {keys} keys per rank, which is neither this rank's {image_local} image "
            f"tokens, its {text_local} text tokens, nor both; cp_plugin masks padding in self-, cross- and joint "
            "attention over the sequences a plan splits"
        )

    def trim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A gathered full sequence without its padding."""
        for length in (self.image_length, self.text_length):
            if length is not None and x.size(dim) == self.padded(length) != length:
                return x.narrow(dim, 0, length)
        return x
