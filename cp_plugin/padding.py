"""Uneven sequences: pad to a multiple of the CP size, mask the padding out of attention, trim it off.

Users train on mixed resolutions and durations, and pipelines trim prompts to their real length,
so a sequence is often not a multiple of the CP size (1001 image tokens, or 7 text tokens, on 2
ranks). The split hooks pad every sequence they split at its end to the next multiple of cp, so
only the last ranks hold padding. Attention must not attend to it: every context-parallel
attention call asks :meth:`SequencePadding.key_mask` for this rank's key-padding mask, which
Ulysses and the ring carry along with the keys, forward and backward. Padded *queries* give rows
nobody reads: the output gather trims them off, so the loss and every gradient are those of the
unpadded sequences, exactly (the padded rows receive zero gradient).

A forward may split several token streams: the image/video tokens and the text tokens of a
``_cp_plan`` (``hidden_states`` and ``encoder_hidden_states*``/``txt_*``, named ``"image"`` and
``"text"``), or every stream a derived plan finds entering the blocks (image and caption refiners,
control latents), each under its own name. The local keys of an attention call are one stream's
local tokens or several streams' together, in one of the model's *joint orders* (text first in Flux,
image first in SD3; learned from the model, see ``streams.py``). So that a local token count always
names its streams, a stream whose local length would tie with an earlier stream of another length
gets one more padded token per rank.

The state lives for one forward of one model: a hook at the model's entry resets it, and it stays
until the next forward so that activation checkpointing recomputes blocks with the same mask (run
a forward's backward before the model's next forward, as training does). The joint orders are the
model's and are kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

TEXT_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "txt_")
IMAGE, TEXT = "image", "text"


def is_text_input(name: object) -> bool:
    """Whether a ``_cp_plan`` input holds text tokens (diffusers' names: ``encoder_hidden_states*``, ``txt_*``, ...)."""
    return isinstance(name, str) and name.startswith(TEXT_INPUTS)


@dataclass
class SequencePadding:
    """The token streams split in the current forward of one model, and this rank's place in the CP group."""

    cp_size: int
    cp_rank: int
    lengths: dict[str, int] = field(default_factory=dict)  # stream -> unpadded length, in order of splitting
    extra: dict[str, int] = field(default_factory=dict)  # stream -> padded tokens beyond the next multiple of cp
    unnamed: set[int] = field(default_factory=set)  # lengths split under no stream's name (matched by length)
    joints: list[tuple[str, ...]] = field(default_factory=list)  # orders of streams in joint tensors (the model's, kept)
    in_blocks: int = 0  # > 0 while a block of a derived plan runs (its attention calls are routed)

    def reset(self) -> None:
        self.lengths, self.extra, self.unnamed = {}, {}, set()
        self.in_blocks = 0

    # lengths -------------------------------------------------------------------------------------
    def _rounded(self, length: int) -> int:
        return -(-length // self.cp_size) * self.cp_size

    def padded_stream(self, stream: str) -> int:
        """Stream ``stream``'s padded length: the next multiple of the CP size, plus its extra tokens."""
        return self._rounded(self.lengths[stream]) + self.extra[stream]

    def local_stream(self, stream: str) -> int:
        """This rank's share of stream ``stream``, padding included."""
        return self.padded_stream(stream) // self.cp_size

    def local_shares(self) -> str:
        """This rank's share of every stream, as errors name them: ``"hidden_states: 64, encoder_hidden_states: 4"``."""
        return ", ".join(f"{stream}: {self.local_stream(stream)}" for stream in self.lengths)

    def padded(self, length: int) -> int:
        """A split ``length``-token sequence padded: as the stream of that length, else to a multiple of cp."""
        for stream, known in self.lengths.items():
            if known == length:
                return self.padded_stream(stream)
        return self._rounded(length)

    def local_length(self, length: int) -> int:
        """This rank's share of a split ``length``-token sequence, padding included."""
        return self.padded(length) // self.cp_size

    def composition(self, local: int) -> tuple[str, ...] | None:
        """Which streams ``local`` tokens of this rank are: one stream, or several in one of the model's joint orders."""
        for stream in self.lengths:
            if self.local_stream(stream) == local:
                return (stream,)
        for order in self.joints:
            if all(s in self.lengths for s in order) and sum(map(self.local_stream, order)) == local:
                return order
        return None

    def register(self, stream: str, length: int, where: str) -> None:
        """Note that ``stream`` (``length`` tokens) is split in this forward.

        A stream whose local length would equal an earlier stream's (of another length), the sum of
        two of them, or make a sum with one that equals another, gets one more padded token per rank
        until it does not.
        """
        known = self.lengths.get(stream)
        if known is not None:
            if known != length:
                raise ValueError(
                    f"two {stream} sequences of {known} and {length} tokens were split in one forward of {where}; "
                    f"cp_plugin pads each token stream to one length per forward. Split inputs of the same stream "
                    "must have the same length"
                )
            return
        others = [self.local_stream(s) for s in self.lengths if self.lengths[s] != length]
        pairs = list(itertools.combinations(others, 2))
        taken = {*others, *(a + b for a, b in pairs), *(abs(a - b) for a, b in pairs)}
        self.lengths[stream], self.extra[stream] = length, 0
        while self.local_stream(stream) in taken:
            self.extra[stream] += self.cp_size

    def set_joint_order(self, order: tuple[str, ...], where: str) -> None:
        """Keep an order in which the model concatenates streams; two orders of the same streams are refused."""
        for known in self.joints:
            if set(known) == set(order) and known != order:
                raise ValueError(
                    f"{where} concatenates its token streams as {' + '.join(order)} after {' + '.join(known)} "
                    "elsewhere; cp_plugin supports one order per set of streams, pass cp_plan"
                )
        if order not in self.joints:
            self.joints.append(order)

    # padding ------------------------------------------------------------------------------------
    def pad_to_split(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        """``x`` (``length`` tokens along ``dim``) padded with zeros (False) to :meth:`padded` ``(length)``."""
        extra = self.padded(length) - length
        if not extra:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_zeros(shape)], dim)

    def pad(self, x: torch.Tensor, dim: int, name: object, where: str) -> torch.Tensor:
        """A ``_cp_plan`` input ``name`` padded along ``dim`` to a multiple of cp (unchanged if cp divides it)."""
        length = x.size(dim)
        stream = TEXT if is_text_input(name) else IMAGE if name == "hidden_states" else None
        if stream is not None and self.lengths.get(stream, length) != length:
            stream = f"{stream} ({where})"  # another sequence split under this name (Helios: history + chunk, chunk)
        if stream is not None:
            self.register(stream, length, f"{where} ('{name}')")
        else:
            self.unnamed.add(length)
        return self.pad_to_split(x, dim, length)

    def local_valid(self, stream: str, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, local)``: which of this rank's tokens of ``stream`` are real."""
        local = self.local_stream(stream)
        valid = min(max(self.lengths[stream] - self.cp_rank * local, 0), local)
        return (torch.arange(local, device=device) < valid).expand(batch, local)

    def needs_mask(self) -> bool:
        """Whether any split sequence of this forward holds padding."""
        return any(self.padded(n) != n for n in (*self.lengths.values(), *self.unnamed))

    def key_mask(self, keys: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """This rank's key-padding mask ``(batch, keys)`` (True = attend), or None if no key is padding."""
        if not self.needs_mask():
            return None
        streams = self.composition(keys)
        if streams is None:
            raise ValueError(
                f"context-parallel attention got {keys} keys per rank, which is neither one stream's local tokens "
                f"({', '.join(f'{s} {self.local_stream(s)}' for s in self.lengths)}) nor several of them in one of "
                "the model's joint orders; cp_plugin masks padding in self-, cross- and joint attention over the streams a plan splits"
            )
        if all(self.padded_stream(s) == self.lengths[s] for s in streams):
            return None  # decided by these keys' streams alone, so a recompute after later streams decides alike
        return torch.cat([self.local_valid(s, batch, device) for s in streams], 1)

    def trim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A gathered full sequence of one stream without its padding."""
        for stream, length in self.lengths.items():
            if x.size(dim) == self.padded_stream(stream) != length:
                return x.narrow(dim, 0, length)
        return x
