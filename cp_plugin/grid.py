"""Convolutions over a split token grid (Sana's Mix-FFN), exact under a split by exchanging halos.

Some DiT blocks put their tokens back on the latent grid and convolve there: Sana's GLUMBConv runs
a 3x3 depthwise ``Conv2d`` between two pointwise ones, on ``tokens.unflatten(1, (height, width))``.
Tokens are split in contiguous row-major runs, so a rank holds a band of grid rows (starting and
ending mid-row when the split is uneven or padded), and a k x k kernel at a token reads the rows
around it, which neighbouring ranks hold.

The reshape into the grid is where the split gets its halo. Inside such a block, :class:`HaloGrid`
turns a reshape of this rank's tokens into the *whole* grid's shape into the whole rows around this
rank's tokens, widened by the blocks' convolution radius: the rows it lacks come from every rank's
edge tokens, all-gathered (the backward reduce-scatters the halos' gradients back to their
owners, ``sequence.gather_sequence``). The block's own code then runs on that band unchanged: its
convolutions keep their zero padding, which is right at the grid's edges, and is wrong only within
the radius of the band's inner edges, rows this rank does not keep. The flatten back to tokens
keeps this rank's tokens (zeros for its padding). So pointwise layers run on the halo rows too (a
few rows per rank), and no convolution is rewritten.

:class:`ProbeGrid` finds those reshapes in the symbolic probe (``probe.py``), which numbers them for
the run time (``blockops.py``): the reshape into the grid gives a grid of a new symbol of rows, so
the reshape back is the one with a dimension of those rows times the rest of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cp_plugin.blockops import RESHAPES, CountingMode, OpCounter, foreign
from cp_plugin.compat import FakeTensorMode, fresh_size, same_size, size_hint
from cp_plugin.sequence import gather_sequence

if TYPE_CHECKING:
    from cp_plugin.mesh import ParallelMesh
    from cp_plugin.padding import SequencePadding

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_TRANSPOSED = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_UNFLATTENS = {torch.Tensor.unflatten, torch.unflatten}
GRID_RESHAPES = RESHAPES | {torch.flatten, torch.Tensor.flatten}  # the ops that enter and leave a grid


def grid_radius(block: torch.nn.Module, where: str) -> int:
    """How many grid rows around its tokens a block's convolutions read: the sum of their radii (0: none).

    Pointwise (1 x ... x 1) convolutions mix no tokens. A convolution with a larger kernel is followed
    by a halo when it keeps the grid's size (stride 1, zero "same" padding, not transposed); others,
    and group norms (statistics over all tokens), are refused, saying why.
    """
    radius = 0
    for name, layer in block.named_modules():
        if isinstance(layer, torch.nn.GroupNorm):
            raise ValueError(
                f"{where}: '{name}' is a GroupNorm, whose statistics run over every token of the grid; under a "
                "split each rank would normalise its own tokens, so it cannot be trained with context parallelism "
                "(ring_degree=1, ulysses_degree=1)"
            )
        if isinstance(layer, _CONVS + _TRANSPOSED) and any(k > 1 for k in layer.kernel_size):
            same = tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation))
            if (isinstance(layer, _TRANSPOSED) or any(s != 1 for s in layer.stride) or layer.padding_mode != "zeros"
                    or any(k % 2 == 0 for k in layer.kernel_size) or layer.padding not in (same, "same")):
                raise ValueError(
                    f"{where}: '{name}' ({type(layer).__name__}, kernel {layer.kernel_size}, stride {layer.stride}, "
                    f"padding {layer.padding}) convolves tokens and changes the grid's size, so a split grid cannot "
                    "be given halos for it; it cannot be trained with context parallelism (ring_degree=1, "
                    "ulysses_degree=1)"
                )
            radius += max(same)
    return radius


def grid_sizes(x: torch.Tensor, func: Callable, args: tuple, kwargs: dict) -> tuple[int, tuple[int, ...]] | None:
    """``(dim, sizes)`` when ``func(x, ...)`` unflattens one dimension of ``x`` into several (a grid)."""
    if func in _UNFLATTENS:
        dim = args[1] if len(args) > 1 else kwargs["dim"]
        sizes = args[2] if len(args) > 2 else kwargs["sizes"]
        return dim % x.dim(), tuple(sizes)
    shape = args[1:] if len(args) > 1 else kwargs.get("shape", kwargs.get("size", ()))
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    extra = len(shape) - x.dim() + 1
    if extra < 2:
        return None
    for dim in range(x.dim()):  # the one dimension of x replaced by ``extra`` sizes, all others kept
        if (all(map(_equal, x.shape[:dim], shape[:dim]))
                and all(map(_equal, x.shape[dim + 1:], shape[dim + extra:]))):
            return dim, tuple(shape[dim:dim + extra])
    return None


def _equal(a: Any, b: Any) -> bool:
    """Two sizes are equal: numbers as numbers, a probe's symbols only if provably so (comparing adds no guard)."""
    return a == b if isinstance(a, int) and isinstance(b, int) else same_size(a, b)


@dataclass(frozen=True)
class GridOps:
    """Which of a block's reshapes (numbered, ``blockops.py``) put a split stream on its grid, and which
    bring the grid back to tokens (with the dimension that then holds them)."""

    entries: tuple[int, ...]
    exits: tuple[tuple[int, int], ...]


class ProbeGrid(CountingMode):
    """In a probe of a block with grid convolutions: a reshape of the symbolic token count into concrete grid
    sizes gives a grid of a new symbol of rows (as the split's band will have its own), and a later reshape
    with a dimension of those rows times the rest of the grid brings it back to tokens, the token count."""

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode, self.counter = fake_mode, OpCounter(GRID_RESHAPES)
        self.entries: list[int] = []
        self.exits: list[tuple[int, int]] = []
        self.bands: list[tuple[Any, Any]] = []  # (band tokens: rows x the rest of the grid, the stream's length)

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        index = self.counter.index(func)
        if index is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x = args[0]
        found = grid_sizes(x, func, tuple(args), kwargs) if func in RESHAPES else None
        if found is not None:
            dim, sizes = found
            length, rest = x.shape[dim], math.prod(sizes[1:])
            if (isinstance(length, torch.SymInt) and all(isinstance(s, int) and s > 0 for s in sizes)
                    and size_hint(length) == math.prod(sizes)):
                self.entries.append(index)
                with foreign():  # rows hinted at 2 or more: a symbol for 1 row would be the constant 1
                    rows = fresh_size(self.fake_mode, max(sizes[0], 2))
                    self.bands.append((rows * rest, length))
                    return x.new_empty((*x.shape[:dim], rows, *sizes[1:], *x.shape[dim + 1:]))
        out = func(*args, **kwargs)
        with foreign():
            for dim, size in enumerate(out.shape if isinstance(out, torch.Tensor) else ()):
                length = next((n for tokens, n in self.bands if same_size(size, tokens)), None)
                if length is not None:
                    self.exits.append((index, dim))
                    return out.new_empty((*out.shape[:dim], length, *out.shape[dim + 1:]))
        return out

    def ops(self) -> GridOps:
        return GridOps(tuple(self.entries), tuple(self.exits))


class HaloGrid(CountingMode):
    """Inside one forward of a block with grid convolutions, at run time: a band of whole rows in at each
    entry the probe found, this rank's tokens out at each exit."""

    def __init__(self, ops: GridOps, padding: SequencePadding, mesh: ParallelMesh, radius: int, where: str) -> None:
        super().__init__()
        self.entries, self.exits, self.counter = ops.entries, dict(ops.exits), OpCounter(GRID_RESHAPES)
        self.padding, self.mesh, self.radius, self.where = padding, mesh, radius, where
        self.band: tuple[int, int, int] | None = None  # (start, real, local) of the band made last

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        index = self.counter.index(func)
        if index in self.entries:
            with foreign():
                return self._entry(args[0], func, tuple(args), kwargs)
        out = func(*args, **kwargs)
        if index in self.exits and self.band is not None:
            with foreign():
                return self._exit(out, self.exits[index])
        return out

    def _entry(self, x: torch.Tensor, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        """The band of rows around this rank's tokens, for the reshape the probe saw put a stream on its grid."""
        found, padding = grid_sizes(x, func, args, kwargs), self.padding
        stream = None if found is None else next(
            (s for s in padding.lengths if padding.local_stream(s) == x.shape[found[0]]), None)
        if stream is None or math.prod(found[1]) != padding.lengths[stream]:
            raise ValueError(
                f"{self.where} puts its tokens on a grid ({getattr(func, '__name__', func)} of a tensor of shape "
                f"{tuple(x.shape)}) in a way its probe did not show (no split stream of that grid's size); "
                "it cannot be trained with context parallelism (ring_degree=1, ulysses_degree=1)"
            )
        (dim, sizes), total = found, padding.lengths[stream]
        band, start, real = self._halo(x, dim, sizes, total)
        self.band = (start, real, x.shape[dim])
        return band.unflatten(dim, (band.shape[dim] // math.prod(sizes[1:]), *sizes[1:]))

    def _halo(self, x: torch.Tensor, dim: int, sizes: tuple[int, ...], total: int) -> tuple[torch.Tensor, int, int]:
        """This rank's tokens of ``x`` with the whole rows around them, ``radius`` rows wider; where its own start."""
        local, rank, slab = x.shape[dim], self.mesh.cp_rank, math.prod(sizes[1:])
        first = rank * local  # this rank's first token in the padded stream
        real = min(max(total - first, 0), local)
        edge = min(local, (self.radius + 1) * slab)  # every token a band needs lies this close to its owner's edge
        edges = torch.cat([x.narrow(dim, 0, edge), x.narrow(dim, local - edge, edge)], dim)
        gathered = gather_sequence(edges, dim, self.mesh)  # every rank's edges: (cp * 2 * edge) along dim

        def taken(positions: range) -> torch.Tensor:
            index = [(p // local) * 2 * edge + (p % local if p % local < edge else edge + p % local - (local - edge))
                     for p in positions]
            return gathered.index_select(dim, torch.tensor(index, dtype=torch.long, device=x.device))

        if not real:  # padding only: its outputs are zeros; the gathered edges still join the graph (backward)
            shape = list(x.shape)
            shape[dim] = slab
            return torch.cat([taken(range(0)), x.new_zeros(shape)], dim), 0, 0
        low = max(0, first // slab - self.radius) * slab
        high = min(sizes[0], -(-(first + real) // slab) + self.radius) * slab
        band = torch.cat([taken(range(low, first)), x.narrow(dim, 0, real), taken(range(first + real, high))], dim)
        return band, first - low, real

    def _exit(self, out: torch.Tensor, dim: int) -> torch.Tensor:
        """The band's grid back as tokens along ``dim``: this rank's tokens, zeros for its padding."""
        start, real, local = self.band
        mine = out.narrow(dim, start, real)
        if real == local:
            return mine
        shape = list(out.shape)
        shape[dim] = local - real
        return torch.cat([mine, out.new_zeros(shape)], dim)
