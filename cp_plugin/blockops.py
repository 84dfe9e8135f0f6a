"""A block's own ops, counted in order: how a probe's finding about one op reaches that op at run time.

The probe (``probe.py``) runs a block once on symbolic shapes, where the symbols tell which reshape
puts a token stream on its grid (``grid.py``) or which product sums over tokens (``reductions.py``);
at run time sizes are numbers and cannot tell (a head dim may equal a token count). Both runs
execute the same block code, so the n-th reshape or product of one is the n-th of the other. Ops
inside attention calls are not the block's (the probe runs each as one SDPA, the run time through
Ulysses and the ring with reshapes of their own), nor are those cp_plugin's own modes make: they
run under :func:`foreign` and are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

RESHAPES = frozenset({torch.Tensor.unflatten, torch.unflatten, torch.reshape, torch.Tensor.reshape, torch.Tensor.view})
PRODUCTS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm})
SUMS = PRODUCTS | {torch.sum, torch.Tensor.sum}  # ops that add over a dimension: the left operand's last, or ``dim``


def summed_dims(func: Callable, args: tuple, kwargs: dict) -> list[int]:
    """The dimensions of its first argument that a ``SUMS`` op adds over (a reduction or softmax: its ``dim``)."""
    x = args[0]
    if func in PRODUCTS:
        return [x.dim() - 1] if all(isinstance(t, torch.Tensor) and t.dim() > 1 for t in args[:2]) else []
    dims = args[1] if len(args) > 1 and not isinstance(args[1], (torch.dtype, bool)) else kwargs.get("dim")
    if dims is None or dims == [] or dims == ():
        return list(range(x.dim()))
    return [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]

_FOREIGN: list[int] = [0]  # > 0: the ops running now are not the block's (a list: compiled code reads it)
_COUNTING: list[int] = [0]  # > 0: a mode that numbers a block's ops is active


def counting() -> bool:
    """Whether a block's ops are being numbered now, so that attention calls must say they are not the block's.

    Attention calls check this before entering :func:`foreign`: a compiled block breaks its graph at
    the attention call, and a ``with`` block around that break would send the whole frame to eager.
    """
    return _COUNTING[0] > 0


class CountingMode(TorchFunctionMode):
    """A function mode that numbers a block's own ops (a probe's, or the run time's that act on them)."""

    def __enter__(self) -> Any:
        _COUNTING[0] += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        _COUNTING[0] -= 1
        return super().__exit__(*exc)


@contextmanager
def foreign() -> Iterator[None]:
    """Around ops that are not the block's own: an attention call, the work of cp_plugin's modes."""
    _FOREIGN[0] += 1
    try:
        yield
    finally:
        _FOREIGN[0] -= 1


class OpCounter:
    """Numbers a block forward's own calls of one family of ops (``RESHAPES`` or ``SUMS``), from 0."""

    def __init__(self, family: frozenset[Callable]) -> None:
        self.family, self.count = family, 0

    def index(self, func: Callable) -> int | None:
        """This call's number if ``func`` is of the family and the block's own, else None."""
        if func not in self.family or _FOREIGN[0]:
            return None
        self.count += 1
        return self.count - 1
