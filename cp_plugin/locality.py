"""Between the blocks of a derived plan: what the model's own code does to split tensors stays right.

A model's forward does a little work between its blocks and after the last one: residual sums,
control hints added, text concatenated to the image for single-stream blocks, tokens prepended or
sliced off. On one process those ops see whole sequences; under a split they see this rank's part.
:class:`Locality`, a function mode around the converted model's forward (idle inside blocks), makes
each such op mean what it means on one process:

- an op that reads a split tensor gives a split tensor (in the same token dimension);
- a whole tensor combined with a split one, as long as the whole sequence along the split tensor's
  token dimension (a per-block text projection concatenated to the split text's features, a
  residual), is split the same way first;
- whole tokens concatenated to split ones along the token dimension (gist or register tokens, a new
  text block) become a stream of their own, split, and the result is a joint stream in that order;
- a slice of a split tensor along its tokens that is not at a boundary between its streams' local
  parts (``hidden_states[:, text_length:]`` with the whole text length, a single token) runs on the
  whole tensor, gathered: the slice then means what it says. A slice at a local boundary (with
  the split text's own length) keeps its part split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from cp_plugin.streams import StreamState

_SLICES = {torch.Tensor.__getitem__, torch.narrow, torch.Tensor.narrow, torch.split, torch.Tensor.split}
_WHOLE_ONLY = {torch.chunk, torch.Tensor.chunk, torch.tensor_split, torch.Tensor.tensor_split, torch.unbind,
               torch.Tensor.unbind, torch.index_select, torch.Tensor.index_select, torch.flip, torch.Tensor.flip,
               torch.roll, torch.Tensor.roll, torch.gather, torch.Tensor.gather}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_RESHAPES = {torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.unflatten, torch.unflatten,
             torch.flatten, torch.Tensor.flatten}
_PERMUTES = {torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose, torch.movedim,
             torch.Tensor.movedim, torch.swapaxes, torch.Tensor.swapaxes}
# Ops that read only the dtype, device or shape of their other tensor arguments, or make new tensors.
_SELF_ONLY = {torch.Tensor.type_as, torch.Tensor.to}
_FRESH = {torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
          torch.Tensor.new_tensor}
_ELEMENTWISE = {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub, torch.Tensor.sub,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.mul, torch.Tensor.mul, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.where, torch.addcmul,
    torch.Tensor.addcmul, torch.lerp, torch.Tensor.lerp,
}


def _shallow(args: tuple, kwargs: dict) -> Iterator[Any]:
    """The arguments of an op, one level of lists and tuples deep (``torch.cat``'s tensors)."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


class Locality(TorchFunctionMode):
    """Around a derived-plan model's forward: split tensors followed and kept right between blocks."""

    def __init__(self, state: StreamState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        state = self.state
        if not state.tracking or state.padding.in_blocks or not len(state.local) or func in _FRESH:
            return func(*args, **kwargs)
        candidates = args[:1] if func in _SELF_ONLY else _shallow(args, kwargs)
        source = next((x for x in candidates if state.is_local(x) and id(x) in state.token_dim), None)
        if source is None:
            return func(*args, **kwargs)
        if func is torch.Tensor.__setitem__ and not state.is_local(args[0]):
            # Split tokens written into a tensor made at the whole length (samples packed into one buffer): whole.
            state.tracking = False
            try:
                whole = state.gather(source, state.token_dim[id(source)], f"a write after block '{state.last_name}'")
                return func(*(whole if a is source else a for a in args), **kwargs)
            finally:
                state.tracking = True
        dim = state.token_dim[id(source)]
        state.tracking = False  # the mode's own ops below are not followed
        try:
            if func in _SLICES or func in _WHOLE_ONLY:
                if args and args[0] is source and (func in _WHOLE_ONLY or not self._at_boundaries(func, args, kwargs,
                                                                                                   dim)):
                    whole = state.gather(source, dim, f"an op ({getattr(func, '__name__', func)}) after block "
                                                      f"'{state.last_name}'")
                    return func(whole, *args[1:], **kwargs)
            elif func in _CATS:
                args, kwargs = self._cat(source, dim, args, kwargs)
            elif func in _ELEMENTWISE:
                args = tuple(self._aligned(source, dim, a) for a in args)
            elif func in _RESHAPES | _PERMUTES and args and args[0] is source:
                return self._reshape(func, source, dim, args, kwargs)
            out = func(*args, **kwargs)
            if func is torch.Tensor.__getitem__ and args[0] is source and isinstance(out, torch.Tensor):
                return state.mark_local(out, _dim_after_index(args[1], source.dim(), dim))
        finally:
            state.tracking = True
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                state.mark_local(t, dim if t.dim() == source.dim() else None)
        return out

    # slices --------------------------------------------------------------------------------------
    def _bounds(self, x: torch.Tensor, dim: int) -> set[int] | None:
        """Where this rank's parts of the streams in ``x`` begin and end along ``dim``."""
        order = self.state.padding.composition(x.shape[dim])
        if order is None:
            return None
        return set(itertools.accumulate((self.state.padding.local_stream(s) for s in order), initial=0))

    def _at_boundaries(self, func: Callable, args: tuple, kwargs: dict, dim: int) -> bool:
        """Whether a slice of ``args[0]`` along ``dim`` cuts only between its streams' local parts."""
        x = args[0]
        length, bounds = x.shape[dim], self._bounds(x, dim)
        if bounds is None:
            return False
        if func is torch.Tensor.__getitem__:
            item = _index_at(args[1], x.dim(), dim)
            if item is None:
                return True
            if not isinstance(item, slice) or item.step not in (None, 1):
                return False
            if any(isinstance(v, int) and abs(v) >= length for v in (item.start, item.stop)):
                # An explicit index at or past the end of this rank's part: a position in the whole sequence
                # (a per-sample length taken before the split), not a cut between this rank's streams.
                return False
            start, stop, _ = item.indices(length)
            return start in bounds and (stop in bounds or stop <= start)
        if func in (torch.narrow, torch.Tensor.narrow):
            along, start, size = (list(args[1:4]) + [kwargs.get("dim"), kwargs.get("start"), kwargs.get("length")])[:3]
            if along % x.dim() != dim:
                return True
            start = int(start) % length if int(start) < 0 else int(start)
            return start in bounds and start + int(size) in bounds
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        along = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if along % x.dim() != dim:
            return True
        sections = [sizes] * -(-length // sizes) if isinstance(sizes, int) else list(sizes)
        cuts = set(itertools.accumulate(sections, initial=0))
        return sum(sections) >= length and {min(c, length) for c in cuts} <= bounds

    def _reshape(self, func: Callable, source: torch.Tensor, dim: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """A reshape that keeps the token dimension whole stays split; one that merges or divides the tokens
        (a grid of rows and columns for a convolution) runs on the whole tensor."""
        try:
            out = func(*args, **kwargs)
        except RuntimeError:  # sizes that only the whole sequence has
            out = None
        moved = None if out is None else _moved_token_dim(func, source, dim, out, args, kwargs)
        if moved is None:
            whole = self.state.gather(source, dim, f"a reshape after block '{self.state.last_name}'")
            return func(whole, *args[1:], **kwargs)
        return self.state.mark_local(out, moved)

    # whole tensors beside split ones ---------------------------------------------------------------
    def _aligned(self, source: torch.Tensor, dim: int, y: Any) -> Any:
        """``y``, split like ``source`` if it is whole and as long as ``source``'s streams along the token dim."""
        state = self.state
        if not isinstance(y, torch.Tensor) or state.is_local(y):
            return y
        order = state.padding.composition(source.shape[dim])
        own = dim - (source.dim() - y.dim())  # broadcasting aligns trailing dims
        if order is None or own < 0:
            return y
        whole = sum(state.padding.lengths[s] for s in order)
        if y.shape[own] != whole or whole == source.shape[dim]:
            return y
        return state.shard(y, own, order)

    def _cat(self, source: torch.Tensor, dim: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A concatenation with split tensors: whole parts split, as their own streams along the tokens."""
        state = self.state
        tensors = list(args[0] if args else kwargs["tensors"])
        along = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        if along % source.dim() != dim:
            tensors = [self._aligned(source, dim, t) for t in tensors]
        else:
            order: list[str] = []
            for i, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.shape[dim] == 0:
                    continue
                if not state.is_local(t):
                    stream = state.new_stream(f"tokens joined after '{state.last_name}'", t.shape[dim])
                    tensors[i] = t = state.shard(t, dim, (stream,))
                part = state.padding.composition(t.shape[dim])
                if part is None:
                    raise ValueError(f"{state.model}: a concatenation after block '{state.last_name}' joins "
                                     f"{t.shape[dim]} split tokens that are no stream's share")
                order += part
            if len(order) > 1:
                state.padding.set_joint_order(tuple(order), f"{state.model} after block '{state.last_name}'")
        return (tensors, along), {k: v for k, v in kwargs.items() if k not in ("tensors", "dim", "axis")}


def _moved_token_dim(func: Callable, x: torch.Tensor, dim: int, out: torch.Tensor, args: tuple, kwargs: dict) -> int | None:
    """Where a reshape or permutation of ``x`` put its token dimension ``dim``; None if it merged or divided it."""
    if func in _PERMUTES:
        order = list(range(x.dim()))
        rest = [a for a in args[1:]] + list(kwargs.values())
        if func in (torch.permute, torch.Tensor.permute):
            order = [d % x.dim() for d in (rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)]
        elif func in (torch.movedim, torch.Tensor.movedim):
            source, destination = (rest[0] if isinstance(rest[0], int) else rest[0][0]) % x.dim(), rest[1]
            order.pop(source)
            order.insert((destination if isinstance(destination, int) else destination[0]) % x.dim(), source)
        else:
            a, b = rest[0] % x.dim(), rest[1] % x.dim()
            order[a], order[b] = order[b], order[a]
        return order.index(dim)
    before = x.shape[:dim].numel()
    for d in range(out.dim()):
        if out.shape[:d].numel() == before and out.shape[d] == x.shape[dim]:
            return d
    return None


def _dim_after_index(index: Any, ndim: int, dim: int) -> int | None:
    """Where ``x[index]`` has dimension ``dim`` of ``x`` (basic indexing: ints drop dims, None adds them)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (torch.Tensor, list)) for i in items):
        return None  # advanced indexing moves dimensions in ways not followed here
    taken = sum(1 for i in items if i is not None and i is not Ellipsis)
    source, out = 0, 0
    for item in items:
        if item is Ellipsis:
            skip = ndim - taken
            if source <= dim < source + skip:
                return out + dim - source
            source, out = source + skip, out + skip
        elif item is None:
            out += 1
        elif source == dim:
            return None if isinstance(item, int) else out
        else:
            source, out = source + 1, out + (0 if isinstance(item, int) else 1)
    return out + dim - source


def _index_at(index: Any, ndim: int, dim: int) -> Any:
    """The part of a ``__getitem__`` index that applies to dimension ``dim``; None if it takes it whole."""
    items = list(index) if isinstance(index, tuple) else [index]
    taken = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        if item is Ellipsis:
            expanded += [slice(None)] * (ndim - taken)
        elif item is not None:
            expanded.append(item)
    if dim >= len(expanded):
        return None
    item = expanded[dim]
    return None if isinstance(item, slice) and item == slice(None) else item
