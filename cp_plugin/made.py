"""Records of how a tensor was made, to make it again in a backward instead of keeping it.

Much of what a DiT block keeps for its backward is cheap to make again from tensors it keeps anyway:
a normalization's output (from the normalization's input), an attention's projection of it (from the
block's input and modulation). A consumer that would keep such a tensor can keep what it was made of
instead, if it knows how it was made. :class:`Made` records that for chosen outputs while they live,
found again by the tensor itself (or a view of all of it), never by its sizes; a record is given only
for a tensor unchanged since it was made (same version, inputs unchanged, same autocast), so a tensor
made again is the tensor that was kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from cp_plugin.compat import tensor_version, view_base
from cp_plugin.tiling import AutocastState, autocast_state, recorded_autocast


def _root(x: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``x``'s storage: ``x``, or what it is a view of (a linear layer's 3-d output is a view of
    its 2-d product)."""
    base = view_base(x)
    return x if base is None else base


_KEPT = object()  # where a skeleton's tensor was


@dataclasses.dataclass
class _Made:
    """How a tensor was made, to make it again in a backward rather than keep it: ``fn(*args, **kwargs)`` (its
    ``index``-th output where it returns several) under ``autocast``, viewed as ``shape``. A tensor argument is kept;
    one that was made so itself is a ``_Made`` too, whose own arguments are kept instead."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    index: int | None
    autocast: AutocastState
    shape: torch.Size
    versions: list[int] = dataclasses.field(default_factory=list)  # of the kept tensors, when made

    def __post_init__(self) -> None:
        self.versions = self.versions or [tensor_version(t) for t in self.kept()]

    def _inputs(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]

    def kept(self) -> list[torch.Tensor]:
        """The tensors it is made from: what a backward that makes it again saves."""
        kept: list[torch.Tensor] = []
        for a in self._inputs():
            kept.extend(a.kept() if isinstance(a, _Made) else [a] if isinstance(a, torch.Tensor) else [])
        return kept

    def unchanged(self) -> bool:
        """Whether no tensor it is made from was written in place since: made again, it is what it was."""
        return [tensor_version(t) for t in self.kept()] == self.versions

    def skeleton(self) -> _Made:
        """It without its tensors (each a placeholder, filled by :meth:`make` in the order of :meth:`kept`), for an
        autograd function to hold beside its saved tensors: a tensor it held itself would outlive a checkpoint."""
        def bare(a: Any) -> Any:
            return a.skeleton() if isinstance(a, _Made) else _KEPT if isinstance(a, torch.Tensor) else a

        return dataclasses.replace(self, args=tuple(bare(a) for a in self.args),
                                   kwargs={name: bare(a) for name, a in self.kwargs.items()}, versions=[])

    def make(self, kept: Iterator[torch.Tensor]) -> torch.Tensor:
        """It again, from the tensors :meth:`kept` listed, in their order."""
        def again(a: Any) -> Any:
            return a.make(kept) if isinstance(a, _Made) else next(kept) if a is _KEPT else a

        args = [again(a) for a in self.args]
        kwargs = {name: again(a) for name, a in self.kwargs.items()}
        with torch.no_grad(), recorded_autocast(self.autocast):
            out = self.fn(*args, **kwargs)
        return (out if self.index is None else out[self.index]).view(self.shape)


class Made:
    """The outputs of normalization layers and of the linear layers that take or feed them or project an attention's
    output, each while it lives, with how it was made."""

    def __init__(self) -> None:
        self.made: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def record(self, out: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record each tensor in ``out`` (a tensor, or a tuple such as an adaptive norm's) as ``fn(*args, **kwargs)``."""
        args, kwargs = tuple(self.source(a) or a for a in args), {k: self.source(a) or a for k, a in kwargs.items()}
        outputs = [(None, out)] if isinstance(out, torch.Tensor) else enumerate(out) if isinstance(out, tuple) else []
        autocast = None
        for index, tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
                autocast = autocast or autocast_state(tensor.device.type)
                self.made[_root(tensor)] = (tensor_version(tensor),
                                            _Made(fn, args, kwargs, index, autocast, tensor.shape))

    def source(self, x: Any) -> _Made | None:
        """How ``x`` was made, if it is a recorded output (or a view of all of one in its layout) unchanged since."""
        if not isinstance(x, torch.Tensor):
            return None
        out = _root(x)
        entry = self.made.get(out)
        if entry is None or entry[0] != tensor_version(out) or not entry[1].unchanged():
            return None
        made = entry[1]
        if made.autocast != autocast_state(x.device.type) or x.numel() != out.numel():
            return None
        if x.storage_offset() != out.storage_offset() or not (x.is_contiguous() and out.is_contiguous()):
            return None
        return dataclasses.replace(made, shape=x.shape, versions=made.versions)
