"""Attention per run of consecutive tokens, against keys every rank holds whole: local under a split.

Wan-Animate's face adapter cuts the video tokens into one run per latent frame
(``query.unflatten(1, (frames, -1))``, the frame count taken from the face-motion input), moves the
runs into the batch, and lets each frame's tokens attend only that frame's motion tokens. The probe
(``probe.py``) finds such a call: its queries are the rest of a reshape of a split sequence into an
input's count of runs, and its keys hold no split tokens. A rank's tokens are one contiguous part of
the stream, so they lie in a contiguous range of runs, and the keys of those runs are whole on every
rank: the attention needs no exchange, only the right runs.

So the block runs on the runs this rank's tokens touch. Its inputs along the split tokens become
those runs, this rank's tokens at their places and zeros elsewhere (tokens other ranks hold, and the
stream's padding); its inputs along the runs' count are cut to those runs; its outputs along the
tokens are cut back to this rank's tokens (zeros for its padding). The zero rows pass only per-token
layers and attend on their own; they are dropped, so they add nothing forward or backward. The block's
code runs unchanged, and its attention runs plainly on the local runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cp_plugin.probe import BlockRoles

if TYPE_CHECKING:
    from cp_plugin.padding import SequencePadding

# Per grouped sequence: (this rank's first token's place in its runs, its real tokens, its local share).
Cuts = dict[str, tuple[int, int, int]]


def _zeros_around(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """``x`` with ``before`` zero rows ahead of it and ``after`` behind it along ``dim``."""
    parts = []
    for n in (before, None, after):
        if n is None:
            parts.append(x)
        elif n:
            shape = list(x.shape)
            shape[dim] = n
            parts.append(x.new_zeros(shape))
    return torch.cat(parts, dim) if len(parts) > 1 else x


def enter_runs(roles: BlockRoles, leaves: list[Any], padding: SequencePadding, rank: int, where: str
               ) -> tuple[list[Any], Cuts]:
    """The block's flattened inputs for the runs this rank's tokens touch, and where its tokens lie in them."""
    leaves, cuts = list(leaves), {}
    for group in roles.groups:
        tokens = [(i, d.dim) for i, dims in enumerate(roles.inputs) for d in dims if group.sequence in d.parts]
        joint = [i for i, dims in enumerate(roles.inputs) for d in dims if group.sequence in d.parts and len(d.parts) > 1]
        streams = padding.composition(leaves[tokens[0][0]].shape[tokens[0][1]])
        if joint or streams is None or len(streams) != 1:
            raise ValueError(f"{where} attends per run of its split tokens, which it also takes joined with other "
                             "tokens; a split can follow runs of one stream only")
        total, local = padding.lengths[streams[0]], padding.local_stream(streams[0])
        i, dim = group.counts[0]
        count = leaves[i].shape[dim]
        if total % count:
            raise ValueError(f"{where} cuts {total} tokens into {count} runs, which does not divide them (one "
                             "process fails too); give the model inputs whose token count the run count divides")
        size, first = total // count, rank * local
        real = min(max(total - first, 0), local)
        low, high = (first // size, -(-(first + real) // size)) if real else (0, 1)  # padding only: one run of zeros
        start = first - low * size if real else 0
        for i, dim in tokens:
            leaves[i] = _zeros_around(leaves[i].narrow(dim, 0, real), dim, start, (high - low) * size - start - real)
        for i, dim in group.counts:
            leaves[i] = leaves[i].narrow(dim, low, high - low)
        cuts[group.sequence] = (start, real, local)
    return leaves, cuts


def exit_runs(roles: BlockRoles, outputs: list[Any], cuts: Cuts) -> list[Any]:
    """The block's flattened outputs along its split tokens cut back from the runs to this rank's tokens."""
    outputs = list(outputs)
    for n, dims in enumerate(roles.outputs[:len(outputs)]):
        for d in dims:
            if isinstance(outputs[n], torch.Tensor) and len(d.parts) == 1 and d.parts[0] in cuts:
                start, real, local = cuts[d.parts[0]]
                outputs[n] = _zeros_around(outputs[n].narrow(d.dim, start, real), d.dim, 0, local - real)
    return outputs
