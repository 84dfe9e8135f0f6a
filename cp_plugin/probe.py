"""Which inputs of a transformer block carry its tokens, along which dimension: the block's own code says.

A derived plan splits every token stream where it enters a block, together with every tensor that is
indexed by the same tokens (rotary tables, per-token modulation, masks, control latents), and nothing
else. Sizes cannot say which dimension that is: 16 image tokens with head dim 16 give a ``(16, 16)``
rotary table, and 3072 tokens of width 3072 a ``(B, 3072, 3072)`` modulation. The block's code can.
:func:`probe_block` runs the block's forward once under ``FakeTensorMode`` (no memory, no arithmetic,
no communication; the same on every rank) with a fresh symbol for every dimension of every input, so
that the block's own operations relate them:

- its attention calls name the token dimensions: the lengths of their queries and keys;
- a broadcast against a rotary table, a modulation or a mask makes that input's dimension one of them;
- a projection makes a feature dimension equal to a weight's size, a constant;
- a concatenation of two token sequences (a joint attention's keys) shows which comes first;
- tokens picked by data (``nonzero`` of a mask: Mochi's valid text) from a sequence no attention
  splits are a *selection*: whole on every rank, joined to split tokens in attention, whose routing
  counts their copies as keys once (``attention/dispatch.py``);
- a token count its code reads as a number (a proportional attention's ``log(S)`` scale) is read
  unguarded in a second probe, so that it stays a symbol (``read_counts``);
- split tokens cut by a count inside an attention layer that takes them as keys only are probed again
  as that layer's whole inputs, which the split gathers there (``BlockRoles.gathered``);
- split tokens cut by a count inside a child of the block that holds no attention (an expert-choice
  router's capacity: NucleusMoE's experts each take their top tokens of the whole sequence) are probed
  again with that child on whole inputs and this rank's rows of its outputs: the split gathers its
  token inputs where they enter it and takes this rank's rows of what it returns (``BlockRoles.localized``).

What comes back is data flow, decided by structure: for every input, the dimensions that index
tokens and which sequences they index, in order; for every attention call, which sequences its
queries and keys are. ``streams.py`` binds those sequences to the streams it splits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch

from cp_plugin.blockops import RESHAPES, SUMS, CountingMode, OpCounter, summed_dims
from cp_plugin.compat import (
    SDPA,
    FakeTensorMode,
    ShapeEnv,
    TorchDispatchMode,
    decomposition,
    expr_hint,
    fresh_size,
    is_backed,
    outside_dispatch_modes,
    quiet_fake_kernels,
    size_expr,
    size_hint,
    symbolic_fake,
    symbolic_fake_mode,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from cp_plugin.grid import GridOps, ProbeGrid, grid_sizes

Parts = tuple[str, ...]  # the token sequences one dimension indexes, in order (several: a joint sequence)
SELECTED = "selected:"  # a part of a joint attention sequence that every rank holds whole, beside split tokens


def is_selection(part: str) -> bool:
    """Whether ``part`` of an attention call's sequence is tokens every rank holds alike beside split ones: picked by
    data (``nonzero`` of a mask) from a sequence every rank holds whole, whose count only the data knows (Mochi's
    valid text), or keys of a fixed count the block takes from outside its inputs (a KV cache's attention-sink and
    history keys, SANA-WM's refiner)."""
    return part.startswith(SELECTED)


@dataclass(frozen=True)
class TokenDim:
    """Dimension ``dim`` of a block input indexes the tokens of ``parts``, in that order."""

    dim: int
    parts: Parts


@dataclass(frozen=True)
class BlockRoles:
    """What a probe of one block found: token dimensions per flattened input, and per attention call."""

    inputs: tuple[tuple[TokenDim, ...], ...]  # one entry per leaf of ``tree_flatten((args, kwargs))``
    attention: tuple[tuple[Parts, Parts], ...]  # (queries, keys) of each attention call; () = not split
    sequences: tuple[str, ...]  # every split token sequence, in the order the inputs first show them
    outputs: tuple[tuple[TokenDim, ...], ...]  # one entry per leaf of the output
    grid: GridOps | None = None  # the block's reshapes (by number) onto its token grid and back (``grid.py``)
    reductions: tuple[tuple[int, int], ...] = ()  # its sums (number, dim) over split tokens (``reductions.py``)
    groups: tuple[TokenGroups, ...] = ()  # split sequences regrouped per entry of another input (``groups.py``)
    # (input, dim, size) of the input sizes the block's code fixed (a loop over the batch, Mochi's per-sample
    # attention) or the probe kept as numbers (0, 1): these roles hold for inputs of those sizes only
    fixed: tuple[tuple[int, int, int], ...] = ()
    # (call, scale) where the block computes an attention call's scale from a token count it reads as a number
    # (Lumina-Next's proportional attention, sqrt(log(S, base)) / sqrt(d)): the scale one process passes, which
    # holds for the whole sizes and plain inputs the probe ran at (``read_counts``)
    scales: tuple[tuple[int, Any], ...] = ()
    # (attention layer's path in the block, flattened input of its call, dim) of the split tokens a layer takes as
    # keys only and cuts by a count (Motif-Video's image-to-video cross-attention keys, encoder[:, 3:]): gathered
    # where they enter that layer, so the cut runs on the whole sequence as on one process (``streams.py``)
    gathered: tuple[tuple[str, int, int], ...] = ()
    # (child's path in the block, flattened output leaf, dim) of what a child that cuts split tokens by a count
    # (NucleusMoE's expert-choice routing) returns over the whole sequence it was given (its inputs in
    # ``gathered``): this rank's rows are taken where it returns, so the child runs as on one process
    localized: tuple[tuple[str, int, int], ...] = ()

    def fit(self, shapes: Sequence[tuple[int, ...] | None]) -> bool:
        """Whether these roles hold for inputs of ``shapes`` (one per flattened input; None: not a tensor)."""
        return all(shapes[i] is not None and shapes[i][dim] == size for i, dim, size in self.fixed)


@dataclass(frozen=True)
class TokenGroups:
    """The block cuts ``sequence`` into as many runs of consecutive tokens as the inputs' dimensions ``counts``
    (flattened input, dim) are long, and attends per run to keys that no split touches (``groups.py``)."""

    sequence: str
    counts: tuple[tuple[int, int], ...]


class _Recording(CountingMode):
    """Attention calls and concatenations made during a probe, with their symbolic sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.attention: list[tuple[Any, Any]] = []
        self.batches: list[tuple[Any, Any]] = []  # (queries, keys) of each attention call: its batch and heads
        self.cats: list[list[Any]] = []
        self.pads: list[tuple[Any, Any, Any]] = []  # (length before, padding before, padding after)
        self.slices: list[tuple[Any, Any]] = []  # (length before, length after) of a slice along one dimension
        self.regroups: list[tuple[Any, Any, Any]] = []  # (length, leading size, the rest) of a dim unflattened
        self.inside: list[str] = []  # the block's attention layers running now (paths), innermost last
        self.slice_at: list[str | None] = []  # per slice, the attention layer it was cut in (None: outside any)
        self.children: list[str] = []  # the block's children without attention running now (paths), outermost first
        self.slice_in: list[str | None] = []  # per slice outside attention layers, the outermost such child running
        self.layer_outputs: dict[str, set[tuple[int, int]]] = {}  # per whole child, (output leaf, dim) of its tokens
        self.attention_at: list[str | None] = []  # per attention call, the layer that made it
        self.block_sizes: dict[int, tuple[int, int]] = {}  # per call with flex's BlockMask, its block size
        self.inner_block_masks: list[int] = []  # the calls whose BlockMask the block built (from its own tokens)
        self.whole_block_masks: set[int] = set()  # ids of BlockMasks built from whole-sequence statistics (compat)
        self._unrecorded = 0  # > 0: inside a mask builder that sees the whole sequence at run time (unrecorded)
        self.layer_inputs: dict[str, list[Any]] = {}  # each hooked layer's flattened inputs at its first call
        self.selections: list[tuple[Any, Any]] = []  # (count, entries) of each nonzero: how many of them are set
        self.sums: list[tuple[int, list[tuple[int, Any]]]] = []  # (number, [(dim, length)]) of its products, sums
        self.statistics: list[tuple[str, Any]] = []  # (op, length) of dimensions softmaxes, means, scans run over
        self.statistic_in: list[tuple[str | None, str | None]] = []  # per statistic, (attention layer, child) running
        self.counter, self.statistic = OpCounter(SUMS), OpCounter(_STATISTICS)
        # Which statistics (indices) each tensor was computed from: only those reaching the block's outputs matter
        # (HiDream's router computes a load-balancing loss from a mean over tokens and drops it).
        self.derived: dict[int, frozenset[int]] = {}
        self.kept: list[Any] = []  # the tensors ``derived`` names, kept alive so that their ids stay theirs
        self.depth = 0  # > 0 while a torch function runs: the sizes it reads as numbers are torch's own
        self.reads: list[Any] = []  # the sizes the block's own code read as numbers (math.log(tokens), say)
        self.numbers: list[tuple[str, tuple]] = []  # every call's plain numbers (attention's scale apart)
        self.scales: list[Any] = []  # the scale of each attention call

    def read(self, expr: Any, hint: Any, number: Callable[[Any], Any] | None) -> Any:
        """A size read as a number (``compat.symbolic_fake_mode``): noted if the block's code read it; the number
        ``number`` gives it, unguarded, or ``None``: torch's guard, which makes it a constant."""
        if self.depth:
            return None
        self.reads.append(expr)
        return None if number is None else number(hint)

    @contextlib.contextmanager
    def whole_sequence_mask(self) -> Iterator[set[int]]:
        """Around a mask builder that runs on the whole sequence at run time (``compat.WHOLE_SEQUENCE_STATISTICS``):
        its ops on this probe's tokens are not the block's and go unrecorded; the masks it returns go into the set
        this yields, so that attention takes them as built over the whole sequence."""
        self._unrecorded += 1
        try:
            yield self.whole_block_masks
        finally:
            self._unrecorded -= 1

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._unrecorded:
            return func(*args, **kwargs)
        plain = {k: v for k, v in kwargs.items() if not (func is SDPA and k == "scale")}
        self.numbers.append((getattr(func, "__name__", repr(func)), _plain((args[:6] if func is SDPA else args, plain))))
        self.depth += 1
        try:
            return self._call(func, args, kwargs)
        finally:
            self.depth -= 1

    def running(self) -> tuple[str | None, str | None]:
        """Where an op runs now: the innermost attention layer, else the outermost child without attention."""
        return (self.inside[-1] if self.inside else None,
                self.children[0] if self.children and not self.inside else None)

    def _call(self, func: Callable, args: Sequence, kwargs: dict) -> Any:
        if func is SDPA:  # (B, H, S, D); dispatch calls arrive here too
            self._attend(*args, **kwargs)
        elif func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            shaped = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim()]
            if len(shaped) > 1 and isinstance(dim, int):
                self.cats.append([t.shape[dim] for t in shaped])
        elif func is torch.nn.functional.pad:
            x, pad = args[0], args[1] if len(args) > 1 else kwargs["pad"]
            for i in range(0, len(pad), 2):
                self.pads.append((x.shape[x.dim() - 1 - i // 2], pad[i], pad[i + 1]))
        index = self.counter.index(func)
        if index is not None and isinstance(args[0], torch.Tensor):
            self.sums.append((index, [(d, args[0].shape[d]) for d in summed_dims(func, tuple(args), kwargs)]))
        sources = frozenset().union(*(self.derived.get(id(x), ()) for x in tree_leaves((tuple(args), kwargs))))
        found = []
        if self.statistic.index(func) is not None and args and isinstance(args[0], torch.Tensor):
            found = [(func.__name__, args[0].shape[d]) for d in summed_dims(func, tuple(args), kwargs)]
        elif func in _ORDERINGS and args and isinstance(args[0], torch.Tensor):
            found = [(func.__name__, args[0].shape[_ordered_dim(func, tuple(args), kwargs) % args[0].dim()])]
        if found:
            self.statistic_in += [self.running()] * len(found)
            sources |= set(range(len(self.statistics), len(self.statistics) + len(found)))
            self.statistics += found
        out = func(*args, **kwargs)
        if func is torch.arange and isinstance(out, torch.Tensor):  # positions 0..n-1: a rank would number its own
            self.statistic_in.append(self.running())
            sources |= {len(self.statistics)}
            self.statistics.append(("arange", out.shape[0]))
        if sources:  # what the op made, and what it wrote into (in-place ops, item assignment)
            written = args[:1] if func is torch.Tensor.__setitem__ or func.__name__.endswith("_") else ()
            for x in (*tree_leaves(out), *written):
                if isinstance(x, torch.Tensor):
                    self.derived[id(x)] = self.derived.get(id(x), frozenset()) | sources
                    self.kept.append(x)
        if func in RESHAPES and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            found = grid_sizes(args[0], func, tuple(args), kwargs)
            if found is not None:
                dim, sizes = found
                rest = out.shape[dim + 1:dim + len(sizes)]
                self.regroups.append((args[0].shape[dim], out.shape[dim], rest[0] if len(rest) == 1 else None))
        if func in (torch.Tensor.__getitem__, torch.narrow, torch.Tensor.narrow):
            x = args[0]
            if isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and out.dim() == x.dim():
                cut = [(a, b) for a, b in zip(x.shape, out.shape) if a is not b]
                self.slices += cut
                at, child = self.running()
                self.slice_at += [at] * len(cut)
                self.slice_in += [child] * len(cut)
        return out

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> None:
        """Note one attention call; its mask must broadcast over ``(batch, heads, queries, keys)``."""
        self.attention.append((query.shape[-2], key.shape[-2]))
        self.attention_at.append(self.inside[-1] if self.inside else None)
        self.batches.append((math.prod(query.shape[:-2]), math.prod(key.shape[:-2])))
        self.scales.append(kwargs.get("scale", args[2] if len(args) > 2 else None))
        if attn_mask is not None:
            torch.broadcast_shapes(attn_mask.shape, (*query.shape[:-1], key.shape[-2]))


def _plain(x: Any) -> tuple:
    """The plain numbers in a call's arguments (slices' bounds too): where a number the block read can go."""
    if isinstance(x, slice):
        x = (x.start, x.stop, x.step)
    if isinstance(x, dict):
        x = tuple(x.items())
    if isinstance(x, (tuple, list)):
        return tuple(n for item in x for n in _plain(item))
    return (x,) if type(x) in (int, float, bool, str) else ()


# Ops over a dimension that a sum over ranks cannot make whole: under a split they see this rank's tokens only.
_STATISTICS = frozenset({torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax, torch.log_softmax,
               torch.Tensor.log_softmax, torch.nn.functional.log_softmax, torch.logsumexp, torch.Tensor.logsumexp,
               torch.mean, torch.Tensor.mean, torch.var, torch.Tensor.var, torch.std, torch.Tensor.std, torch.amax,
               torch.Tensor.amax, torch.amin, torch.Tensor.amin, torch.cumsum, torch.Tensor.cumsum, torch.cumprod,
               torch.Tensor.cumprod})

# Ops that order a dimension (an expert-choice router's top tokens): under a split they rank this rank's tokens only.
_ORDERINGS = frozenset({torch.topk, torch.Tensor.topk, torch.kthvalue, torch.Tensor.kthvalue, torch.sort,
                        torch.Tensor.sort, torch.argsort, torch.Tensor.argsort})


def _ordered_dim(func: Callable, args: tuple, kwargs: dict) -> int:
    """The dimension an ``_ORDERINGS`` op orders: ``topk``/``kthvalue`` take a count before it, the others not."""
    position = 2 if func in (torch.topk, torch.Tensor.topk, torch.kthvalue, torch.Tensor.kthvalue) else 1
    dim = args[position] if len(args) > position and isinstance(args[position], int) else kwargs.get("dim", -1)
    return int(dim)


# The probe running now, if any (a list rather than a ContextVar: compiled blocks read it without a graph break).
_RECORDING: list[_Recording] = []


def recording() -> _Recording | None:
    """The probe running now, if any: attention calls are then noted and run plainly (``attention/dispatch.py``)."""
    return _RECORDING[-1] if _RECORDING else None


class _Decompose(TorchDispatchMode):
    """Ops whose kernels take no symbolic sizes run through torch's decompositions: those that fail on them,
    and ``constant_pad_nd``, whose fake kernel quietly makes every size of its input a constant.

    ``nonzero`` (``torch.where(mask)``, boolean indexing) counts entries set in data the probe does not have.
    torch's fake kernel names that count by an unbacked symbol, on which the model's own arithmetic cannot
    branch (Mochi pads its attention output by ``text - count`` back to the whole length); the probe names
    it by a fresh symbol hinted at every entry set instead, and notes it as a selection (``_Recording``)."""

    def __init__(self, fake_mode: FakeTensorMode, record: _Recording) -> None:
        super().__init__()
        self.fake_mode, self.record = fake_mode, record

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:
            x, entries = args[0], args[0].numel()
            hint = size_hint(entries) if isinstance(entries, torch.SymInt) else entries
            count = fresh_size(self.fake_mode, max(hint, 2))  # a symbol: 0 and 1 would be constants
            self.record.selections.append((count, entries))
            return torch.empty((count, x.dim()), dtype=torch.long, device=x.device)
        if func is torch.ops.aten.constant_pad_nd.default:
            return decomposition(func)(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError as err:
            decomposed = decomposition(func)
            if decomposed is None or "concrete integers" not in str(err):
                raise
            return decomposed(*args, **kwargs)


class ProbeError(ValueError):
    """The block could not be run on symbolic shapes, or relates its tokens in a way no split can follow."""


class _WholeChildren(ProbeError):
    """The block cuts split tokens by a count, or takes a statistic over them, each inside a child of the block that
    holds no attention: ``inputs`` names, per child, the (flattened input, dim) that carry split tokens, to be probed
    again with the child run on them whole and this rank's rows taken from its outputs. A second refusal stands, and
    so does ``refusal`` where a child gives back no output along the tokens it was given (it read their count as a
    number: SanaWM's recurrent scan over frames reshapes by the grid's sizes)."""

    def __init__(self, inputs: dict[str, tuple[tuple[int, int], ...]], refusal: str) -> None:
        super().__init__(refusal)
        self.inputs, self.refusal = inputs, refusal


class _KeysOnly(ProbeError):
    """The block cuts split tokens by a count, inside attention layers that take those tokens as keys only:
    ``inputs`` names, per layer, the (flattened input, dim) that carry them, to be probed again whole (a probe
    given whole inputs refuses any cut it still finds instead)."""

    def __init__(self, inputs: dict[str, tuple[tuple[int, int], ...]]) -> None:
        super().__init__(f"attention layers take split tokens as keys only and cut them by a count: {inputs}")
        self.inputs = inputs


def probe_block(
    forward: Callable[..., Any], args: tuple, kwargs: dict, names: Sequence[str], where: str,
    shapes: Sequence[tuple[int, ...] | None] | None = None, grid: bool = False,
) -> BlockRoles:
    """Run ``forward(*args, **kwargs)`` once on symbolic shapes and return which inputs index which tokens.

    ``names`` names the flattened inputs, for messages; ``shapes`` gives the shape to probe an input
    at where it is not its own (a split input is probed whole, as one process would pass it); ``grid``:
    the block convolves its tokens on their grid (``grid.py``), whose reshapes are followed.
    Raises :class:`ProbeError` saying what failed.
    """
    probe: tuple = (forward, args, kwargs, names, where, shapes, grid, {}, False)
    record, _, roles, probe = _probe_layers_whole(probe)
    return read_counts(probe, roles) if record.reads else roles


def _probe_layers_whole(probe: tuple, number: Callable[[Any], Any] | None = None
                        ) -> tuple[_Recording, _Resolver, BlockRoles, tuple]:
    """``_probe``, and where it finds layers that must take split tokens whole (``_KeysOnly``, ``_WholeChildren``),
    again with those layers' inputs whole: a second refusal stands. Also returns the probe's arguments that gave
    the roles, for probes that read the block's sizes as other numbers (``read_counts``)."""
    try:
        record, resolver, roles = _probe(*probe, number=number)
    except (_KeysOnly, _WholeChildren) as found:
        probe = (*probe[:-2], found.inputs, isinstance(found, _WholeChildren))
        record, resolver, roles = _probe(*probe, number=number)
        if isinstance(found, _WholeChildren) and set(record.layer_outputs) != set(found.inputs):
            raise ProbeError(found.refusal) from found
        roles = dataclasses.replace(roles, gathered=tuple(
            (layer, index, dim) for layer, entries in found.inputs.items() for index, dim in entries),
            localized=tuple((layer, index, dim) for layer, entries in record.layer_outputs.items()
                            for index, dim in sorted(entries)))
    return record, resolver, roles, probe


def read_counts(probe: tuple, roles: BlockRoles) -> BlockRoles:
    """The roles of a block that reads sizes as numbers, which made them constants in its probe.

    Probed again with those numbers unguarded, the sizes stay symbols: if they are counts of split
    tokens, a rank would read its own count where one process reads the sequence's. That is exact only
    where the number reaches nothing but an attention call's scale (a proportional attention's
    ``sqrt(log(S, base))``): a third probe reads another count, and every other plain number the block
    passes to torch must stay the same. Those calls then take the scale this probe, at whole sizes,
    passed (``BlockRoles.scales``); anything else the count reaches is refused.
    """
    where = probe[4]
    try:
        whole, resolver, found, probe = _probe_layers_whole(probe, lambda hint: hint)
    except ProbeError as err:  # the guarded probe may have made a token count a constant: its roles would not hold
        raise ProbeError(
            f"{where}: it reads a size as a number, and the probe that keeps that number a size fails ({err}); "
            "whether it is a count of split tokens, which a rank would read as its own, cannot be told"
        ) from err
    counts = [e for e in whole.reads if resolver.env.simplify(e).free_symbols & resolver.split]
    if not counts:
        return roles  # it read other sizes (a batch, a width): constants either way
    if whole.block_sizes and all(_block_padding(resolver.env.simplify(e), whole.block_sizes.values()) for e in counts):
        return roles  # the zeros flex attention's tokens are padded with: the guarded probe strips them, and so does
        # the routing, at whatever the count (attention/dispatch.py)
    try:
        other = _probe_layers_whole(probe, lambda hint: hint // 2 if hint >= 4 else hint + 1)[0]
    except ProbeError:
        other = None
    if other is None or other.numbers != whole.numbers:
        raise ProbeError(
            f"{where}: it reads the count of split tokens as a number ({resolver.env.simplify(counts[0])}) and computes "
            "more than an attention call's scale from it; under a split that would be this rank's count, not the "
            "sequence's"
        )
    scales = tuple((i, s) for i, (s, t) in enumerate(zip(whole.scales, other.scales)) if s != t)
    return dataclasses.replace(found, scales=scales)


def _fixed_runs_joined(sizes: list[sympy.Expr]) -> list[sympy.Expr]:
    """A concatenation's sizes with each run of numbers summed: several fixed parts (a cache's sink and history
    keys) are one part of fixed count beside the token sequences."""
    joined: list[sympy.Expr] = []
    for size in sizes:
        if joined and size.is_Integer and joined[-1].is_Integer:
            joined[-1] += size
        else:
            joined.append(size)
    return joined


def _block_padding(count: sympy.Expr, block_sizes: Any) -> bool:
    """Whether a number read from a token count S is the padding that takes S to a multiple of flex attention's block
    size (``ceil(S / 128) * 128 - S``, as AnyFlow-FAR's processor computes it): the same function over three blocks."""
    if len(count.free_symbols) != 1:
        return False
    symbol = next(iter(count.free_symbols))
    return any(all(int(count.subs(symbol, n)) == -n % rows for n in range(1, 3 * rows + 1)) for rows, _ in block_sizes)


def _probe(
    forward: Callable[..., Any], args: tuple, kwargs: dict, names: Sequence[str], where: str,
    shapes: Sequence[tuple[int, ...] | None] | None, grid: bool, whole: dict[str, tuple[tuple[int, int], ...]],
    localize: bool, number: Callable[[Any], Any] | None = None,
) -> tuple[_Recording, _Resolver, BlockRoles]:
    """One probe of the block; ``whole``: the layers' inputs to give fresh (unsplit) token counts (``_KeysOnly``,
    ``_WholeChildren``), with ``localize`` their outputs given the block's token counts back (this rank's rows);
    ``number`` gives the sizes its code reads as numbers (``None``: guarded)."""
    leaves, spec = tree_flatten((args, kwargs))
    record = _Recording()
    fake_mode, env = symbolic_fake_mode(lambda expr, hint: record.read(expr, hint, number))
    fakes = [_symbolic(fake_mode, x, shape) for x, shape in zip(leaves, shapes or [None] * len(leaves))]
    fake_args, fake_kwargs = tree_unflatten(fakes, spec)
    grids = ProbeGrid(fake_mode) if grid else contextlib.nullcontext()
    _RECORDING.append(record)
    # the block whose forward this is, under the hooks diffusers' registry wraps it in (the memory options' hooks:
    # each wrapper names the forward it wraps as ``__wrapped__``, down to the block's bound method)
    layers = _LayerHooks(getattr(inspect.unwrap(forward), "__self__", None), record, whole, fake_mode, localize)
    try:
        # Outside the caller's dispatch modes: selective checkpointing would keep the probe's fake attention
        # outputs and count its ops as the block's, and a recompute (which probes nothing) would not match.
        with (outside_dispatch_modes(), quiet_fake_kernels(), torch.no_grad(), fake_mode, _Decompose(fake_mode, record),
              record, grids, layers):
            output = forward(*fake_args, **fake_kwargs)
    except ProbeError as err:  # an attention call the routing refuses (its mask's type), named for this block
        raise ProbeError(f"{where}: {err}") from err
    except Exception as err:  # noqa: BLE001 - any failure of the model's code under fake tensors
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if type(err).__name__ == "GuardOnDataDependentSymNode":
            raise ProbeError(
                f"{where} takes sizes from the values of its inputs (a tensor's .tolist() or .item(): per-sample grid "
                "sizes, token counts kept in a tensor) and branches or slices on them, so the probe cannot tell which "
                f"of its inputs carry tokens ({message[:200]}); pass those sizes as Python numbers"
            ) from err
        raise ProbeError(
            f"{where} could not be run on symbolic shapes to find which of its inputs carry tokens "
            f"({type(err).__name__}: {message[:300]})"
        ) from err
    finally:
        _RECORDING.pop()
    # A child run whole would put whole tokens on the grid that the block's halo exchange follows by number: not tried
    resolver = _Resolver(env, record, where, fakes, retried=bool(whole), whole_children=not grid and not whole)
    roles = resolver.roles(fakes, names, output)
    return record, resolver, dataclasses.replace(roles, grid=grids.ops()) if grid else roles


class _LayerHooks:
    """While a probe runs: which of the block's attention layers is running (``_Recording.inside``) and which of its
    children without attention (``_Recording.children``), the inputs of each at its first call, and the inputs
    ``whole`` names given fresh token counts, as if gathered there; with ``localize``, a child's outputs along those
    fresh counts are given the block's own counts back, as the split takes this rank's rows of them."""

    def __init__(self, block: Any, record: _Recording, whole: dict[str, tuple[tuple[int, int], ...]],
                 fake_mode: FakeTensorMode, localize: bool = False) -> None:
        from cp_plugin.plans import attention_modules  # plans -> attention.dispatch -> probe

        is_block = isinstance(block, torch.nn.Module)
        self.layers = attention_modules(block) if is_block else []
        self.children = [(path, child) for path, child in (block.named_children() if is_block else ())
                         if not isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
                         and not attention_modules(child)]
        self.record, self.whole, self.fake_mode, self.localize = record, whole, fake_mode, localize
        self.handles: list[Any] = []
        self.fresh: list[dict[Any, Any]] = []  # per whole child running, its fresh token counts -> the block's

    def __enter__(self) -> _LayerHooks:
        for (path, layer), stack in [*((entry, self.record.inside) for entry in self.layers),
                                     *((entry, self.record.children) for entry in self.children)]:
            self.handles += [
                layer.register_forward_pre_hook(functools.partial(self.enter, path, stack), with_kwargs=True),
                layer.register_forward_hook(functools.partial(self.exit, path, stack), always_call=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def enter(self, path: str, stack: list[str], layer: torch.nn.Module, args: tuple, kwargs: dict
              ) -> tuple[tuple, dict]:
        leaves, spec = tree_flatten((args, kwargs))
        fresh = {}
        for index, dim in self.whole.get(path, ()):
            shape = list(leaves[index].shape)
            shape[dim] = fresh_size(self.fake_mode, size_hint(shape[dim]))
            fresh[shape[dim].node.expr] = leaves[index].shape[dim]
            leaves[index] = leaves[index].new_empty(shape)
        if stack is self.record.children and path in self.whole:
            self.fresh.append(fresh)
        self.record.layer_inputs.setdefault(path, leaves)
        stack.append(path)
        return tree_unflatten(leaves, spec)

    def exit(self, path: str, stack: list[str], layer: torch.nn.Module, args: tuple, output: Any) -> Any:
        stack.pop()
        if stack is not self.record.children or path not in self.whole:
            return None
        fresh = self.fresh.pop()
        if not self.localize:
            return None
        leaves, spec = tree_flatten(output)
        for index, x in enumerate(leaves):
            sizes = list(x.shape) if isinstance(x, torch.Tensor) else []
            dims = [d for d, size in enumerate(sizes) if isinstance(size, torch.SymInt) and size.node.expr in fresh]
            for d in dims:
                sizes[d] = fresh[sizes[d].node.expr]
                self.record.layer_outputs.setdefault(path, set()).add((index, d))
            if dims:
                leaves[index] = x.new_empty(sizes)
        return tree_unflatten(leaves, spec)


def _symbolic(fake_mode: FakeTensorMode, x: Any, shape: tuple[int, ...] | None) -> Any:
    """A fake copy of ``x`` (of ``shape`` if given) with a fresh symbol for every dimension."""
    if not isinstance(x, torch.Tensor):
        return x
    if shape is None:
        return symbolic_fake(fake_mode, x)
    fake = symbolic_fake(fake_mode, torch.empty(shape, dtype=x.dtype, device="meta"))
    with fake_mode:
        return fake.to(x.device)


class _Resolver:
    """Turns a finished probe's symbols into token sequences, named by their symbols.

    The sequences a block splits are those its attention takes queries from; keys of another
    sequence concatenated with them are split too, and every input dimension that spans a split
    sequence. A sequence that only ever gives keys and values (the text of cross-attention) stays
    whole on every rank: each rank's queries attend all of it, which is exact and needs no exchange.
    """

    def __init__(self, env: ShapeEnv, record: _Recording, where: str, fakes: Sequence[Any], retried: bool = False,
                 whole_children: bool = False) -> None:
        self.env, self.where, self.retried, self.whole_children = env, where, retried, whole_children
        self.aligned: dict[sympy.Symbol, sympy.Expr] = {}
        self.cats = [[self.expr(size) for size in cat] for cat in record.cats]
        self.calls = [(self.expr(q), self.expr(k)) for q, k in record.attention]
        self.inner_block_masks = record.inner_block_masks
        for i, sizes in record.block_sizes.items():
            self.calls[i] = tuple(self.unpadded(length, size, record) for length, size in zip(self.calls[i], sizes))
        # Queries cut per entry of another input: a token dim of length S unflattened into (count, rest), the count
        # a dimension of its own (Wan-Animate's frames), and attention over runs of rest consecutive tokens.
        runs = {}
        for length, count, rest in record.regroups:
            length, count, rest = self.expr(length), self.expr(count), None if rest is None else self.expr(rest)
            if (isinstance(length, sympy.Symbol) and isinstance(count, sympy.Symbol) and count != length
                    and rest is not None and rest.free_symbols == {length, count}):
                runs[rest] = (length, count)
        self.grouped = {i: runs[q] for i, (q, _) in enumerate(self.calls) if q in runs}
        self.statistics = [(op, self.expr(length)) for op, length in record.statistics]
        self.statistic_in = record.statistic_in
        self.derived = record.derived
        self.sums = [(i, [(d, self.expr(length)) for d, length in dims]) for i, dims in record.sums]
        for i, (q, _) in enumerate(record.attention):
            if isinstance(q, torch.SymInt) and q.node.expr.free_symbols and not self.calls[i][0].free_symbols:
                raise ProbeError(
                    f"{where}: it reads the token count of its attention call {i} as a number ({q.node.expr} = "
                    f"{self.calls[i][0]}: a scale from log(tokens), say), which under a split would be this rank's "
                    "count, not the sequence's"
                )
        shapes = [[self.expr(size) for size in x.shape] for x in fakes if isinstance(x, torch.Tensor)]
        # Tokens selected by data are never split: every rank selects them alike from tokens it holds whole.
        self.selected = {e for e in (self.expr(count) for count, _ in record.selections) if isinstance(e, sympy.Symbol)}
        self.split = set().union(*({self.grouped[i][0]} if i in self.grouped else q.free_symbols
                                   for i, (q, _) in enumerate(self.calls))) - self.selected
        grown = True
        while grown:  # keys beside split keys, and inputs spanning split and other tokens, are split too
            spans = [k.free_symbols for _, k in self.calls] + [e.free_symbols for shape in shapes for e in shape]
            joined = (set().union(*(free for free in spans if free & self.split)) | self.split) - self.selected
            grown, self.split = joined != self.split, joined
        for i, (length, count) in self.grouped.items():
            if (self.calls[i][1].free_symbols | {count}) & self.split:
                raise ProbeError(
                    f"{where}: attention call {i} cuts the split tokens {length} into {count} runs and attends per "
                    f"run to keys ({self.calls[i][1]}) that are split tokens too, or split beside the runs' count; "
                    "a rank holds only part of a run, so those keys would be incomplete"
                )
        self.aligned.update({rest: runs[rest][0] / runs[rest][1] for rest in {self.calls[i][0] for i in self.grouped}})
        for i in self.grouped:  # the runs went into the batch beside the keys': attention makes the two batches equal
            queries, keys = (self.expr(b) for b in record.batches[i])
            own = keys.free_symbols - queries.free_symbols
            solved = sympy.solve(sympy.Eq(queries, keys), *own) if queries != keys and len(own) == 1 else []
            if len(solved) == 1:
                self.aligned[next(iter(own))] = solved[0]
        for count, entries in record.selections:
            if self.expr(entries).free_symbols & self.split:
                raise ProbeError(
                    f"{where}: it selects tokens by their data (nonzero of {self.expr(entries)} entries) among the "
                    "tokens of a split sequence, which under a split would select among this rank's tokens only"
                )
        for length, before, after in record.pads:
            self.align(self.expr(length), self.expr(before), self.expr(after))
        self.sliced: dict[sympy.Symbol, sympy.Expr] = {}  # an input's length -> the tokens a slice cut from it
        # tokens cut at a fixed position: (length, cut, the attention layer that cut them or None, the child without
        # attention that cut them or None)
        self.fixed: list[tuple[sympy.Expr, sympy.Expr, str | None, str | None]] = []
        self.attention_at, self.layer_inputs = record.attention_at, record.layer_inputs
        for (length, cut), at, child in zip(record.slices, record.slice_at, record.slice_in):
            length, cut = self.expr(length), self.expr(cut)
            data_dependent = not all(is_backed(env, sym) and sym not in self.selected  # a routing's token count
                                     for sym in cut.free_symbols)
            if length.free_symbols & self.split and cut != 0 and cut != length and not data_dependent and not (
                    cut.free_symbols and all(t in self.split for t in sympy.Add.make_args(cut))):
                self.fixed.append((length, cut, at, child))
            if isinstance(length, sympy.Symbol) and length not in self.split and cut.free_symbols & self.split:
                if expr_hint(self.env, length) == expr_hint(self.env, cut):
                    self.aligned[length] = cut  # the slice takes all of it: it is as long as the tokens
                else:
                    self.sliced[length] = cut

    def keys_only_inputs(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Where every cut by a count is made inside an attention layer, of split tokens that layer takes no queries
        from (so as keys only): per layer, its (flattened input, dim) holding those tokens; else nothing."""
        found: dict[str, set[tuple[int, int]]] = {}
        for length, _, at, _ in self.fixed:
            if at is None:
                return {}
            queries = set().union(*(q.xreplace(self.aligned).free_symbols for (q, _), where in zip(self.calls, self.attention_at)
                                    if where == at))
            keys = (length.free_symbols & self.split) - queries
            inputs = {(i, d) for i, x in enumerate(self.layer_inputs[at]) if isinstance(x, torch.Tensor)
                      for d, size in enumerate(x.shape) if self.expr(size).free_symbols & keys}
            if not keys or not inputs:
                return {}
            found.setdefault(at, set()).update(inputs)
        return {at: tuple(sorted(entries)) for at, entries in found.items()}

    def whole_children_inputs(self, mixed: list[int]) -> dict[str, tuple[tuple[int, int], ...]]:
        """Where every cut by a count, and every statistic over split tokens that reaches the outputs (``mixed``), is
        made inside a child of the block that holds no attention: per child, its (flattened input, dim) holding split
        tokens, which it can take whole (as one process gives them); else nothing."""
        found: dict[str, set[tuple[int, int]]] = {}
        for at, child in [(at, child) for _, _, at, child in self.fixed] + [self.statistic_in[i] for i in mixed]:
            inputs = {(i, d) for i, x in enumerate(self.layer_inputs.get(child, ())) if isinstance(x, torch.Tensor)
                      for d, size in enumerate(x.shape) if self.expr(size).free_symbols & self.split}
            if at is not None or child is None or not inputs:
                return {}
            found.setdefault(child, set()).update(inputs)
        return {child: tuple(sorted(entries)) for child, entries in found.items()}

    def unpadded(self, length: sympy.Expr, block: int, record: _Recording) -> sympy.Expr:
        """The tokens of an attention call with flex's ``BlockMask``, without the zeros its processor padded them with
        to a multiple of the mask's block size: flex attention takes sequences so padded.

        The padding is a number the processor computed from the count, ``ceil(S / 128) * 128 - S``. Where it
        appended that many zeros (AnyFlow-FAR's), the padding is a constant here; where it padded to the
        rounded length (Qwen-Image 2.1's ``F.pad``), the length is a constant and the padding made it: the
        tokens are what was padded. Tokens the block adds (registers, say) are no padding to the block size.
        """
        extra, tokens = length.as_coeff_Add()
        if tokens.free_symbols and 0 < extra < block and expr_hint(self.env, length) % block == 0:
            return tokens
        if length.free_symbols or length % block:
            return length
        padded = {before for before, pad_before, pad_after in
                  ((self.expr(a), self.expr(b), self.expr(c)) for a, b, c in record.pads)
                  if before.free_symbols and pad_before == 0 and sympy.expand(before + pad_after) == length}
        if len(padded) > 1:
            raise ProbeError(
                f"{self.where}: an attention call with flex attention's BlockMask takes {length} tokens padded from "
                f"one of {', '.join(map(str, padded))}, and the block does not show which; pad the tokens of that call "
                "only, or train this model without context parallelism (ring_degree=1, ulysses_degree=1)"
            )
        return next(iter(padded), length)

    def expr(self, size: Any) -> sympy.Expr:
        found = size_expr(self.env, size)
        return found.xreplace(self.aligned) if self.aligned else found

    def align(self, length: sympy.Expr, before: sympy.Expr, after: sympy.Expr) -> None:
        """A tensor padded to the length of a joint token sequence holds the part of it at its end (or start).

        HunyuanVideo 1.5 pads its text mask on the left to the image + text length, so the mask's own
        length is never compared with anything: which part of the sequence it covers is where it ends
        up. It covers the trailing (leading) parts whose total length is its own.
        """
        total = sympy.expand(length + before + after)
        if not (isinstance(length, sympy.Symbol) and length not in self.split and total.free_symbols & self.split):
            return
        terms = sympy.Add.make_args(total)
        if any(t not in self.split for t in terms):
            return
        try:
            ordered = self.ordered(terms, "a padded input")
        except ProbeError:
            return
        ends = [ordered[i:] for i in range(1, len(ordered))] if after == 0 else [ordered[:i] for i in range(1, len(ordered))]
        hint = expr_hint(self.env, length)
        fits = [sympy.Add(*end) for end in ends if expr_hint(self.env, sympy.Add(*end)) == hint]
        if len(fits) == 1:
            self.aligned[length] = fits[0]

    def parts(self, expr: sympy.Expr, what: str, strict: bool = True, keys: bool = False) -> Parts:
        """The split token sequences a dimension of length ``expr`` indexes, in order; () if none.

        ``keys``: an attention call's keys, which may also hold a fixed number of keys the block takes from
        outside its inputs (a KV cache's prefix: every input's sizes are symbols here, so a number is none of
        them). Every rank holds them alike, as it holds a selection.
        """
        if not expr.free_symbols & self.split:
            return ()
        terms = sympy.Add.make_args(expr)
        fixed = {t for t in terms if keys and t.is_Integer and t > 0}
        if (any(t not in self.split and t not in self.selected and t not in fixed for t in terms)
                or len(set(terms)) != len(terms)):
            if not strict:
                return ()
            raise ProbeError(
                f"{self.where}: {what} has length {expr} in terms of its token counts "
                f"({', '.join(sorted(map(str, self.split)))}), which is neither one token sequence nor several "
                "concatenated; a split cannot follow tokens that the block adds, drops or reshapes"
            )
        return tuple(SELECTED * (t in self.selected or t in fixed) + str(t) for t in self.ordered(terms, what))

    def ordered(self, terms: tuple[sympy.Expr, ...], what: str) -> list[sympy.Expr]:
        """``terms`` in the order a concatenation made during the probe put them."""
        if len(terms) == 1:
            return list(terms)
        total = sympy.Add(*terms)
        for cat in self.cats:
            if all(size != 0 for size in cat) and sympy.expand(sympy.Add(*cat) - total) == 0:
                pieces = [sympy.Add.make_args(size) for size in _fixed_runs_joined(cat)]
                if all(set(p) <= set(terms) for p in pieces):
                    return [t for p in pieces for t in self.ordered(p, what)]
        raise ProbeError(
            f"{self.where}: {what} spans the token sequences {' + '.join(map(str, terms))} together, and no "
            "concatenation in the block shows their order"
        )

    def dims(self, x: Any, what: str, strict: bool = True) -> tuple[TokenDim, ...]:
        if not isinstance(x, torch.Tensor):
            return ()
        found = ((dim, self.parts(self.expr(size), f"{what} (dim {dim})", strict)) for dim, size in enumerate(x.shape))
        return tuple(TokenDim(dim, parts) for dim, parts in found if parts)

    def mixing_error(self, mixed: list[int]) -> ProbeError:
        """The refusal of a block that cuts split tokens by a count, else of one whose outputs a statistic over split
        tokens (``mixed``) reaches."""
        if self.fixed:
            length, cut, _, _ = self.fixed[0]
            return ProbeError(
                f"{self.where}: it cuts {cut} of the {length} tokens of a split sequence by a count rather than at a "
                "boundary between sequences (history or image-context tokens kept at the start of a stream, or an "
                "expert's token capacity): every rank would cut its own part there"
            )
        op, length = self.statistics[mixed[0]]
        if op == "arange":
            return ProbeError(
                f"{self.where}: it numbers split tokens (torch.arange over their count, {length}: positions for a "
                "rotary table or a mask, say), which under a split would number this rank's tokens from 0; compute "
                "positions before the blocks, where the split takes each rank's share of them"
            )
        return ProbeError(
            f"{self.where}: it takes a {op} over split tokens ({length} of them; a softmax outside SDPA and "
            "dispatch_attention_fn is attention computed by hand), which under a split would see this rank's "
            "tokens only; for attention, set a processor that calls one of them (attn.set_processor(...))"
        )

    def roles(self, fakes: Sequence[Any], names: Sequence[str], output: Any) -> BlockRoles:
        if self.inner_block_masks:
            raise ProbeError(
                f"{self.where}: attention call {self.inner_block_masks[0]} takes flex attention's BlockMask built inside "
                "the block from the tokens it holds (a block-sparse pattern from its queries and keys, as NABLA's), "
                "which under a split would cover this rank's tokens only; a split follows a BlockMask built over the "
                "whole sequence before the blocks and passed to them"
            )
        reaching = frozenset().union(*(self.derived.get(id(x), ()) for x in tree_leaves(output)))
        mixed = [i for i in sorted(reaching) if self.statistics[i][1].free_symbols & self.split]
        if self.fixed:
            length, cut, _, _ = self.fixed[0]
            per_cut = [i for i, (q, k) in enumerate(self.calls) if not q.free_symbols or not k.free_symbols]
            if per_cut:  # attention calls over runs of tokens cut at fixed positions: a mask decomposed into calls
                i = per_cut[0]
                raise ProbeError(
                    f"{self.where}: it cuts {cut} of the {length} tokens of a split sequence at fixed positions and "
                    f"runs its attention per run of them (call {i}: {self.calls[i][0]} queries, {self.calls[i][1]} "
                    "keys; a block-causal mask decomposed into one call per segment): every rank would cut its own "
                    "part there. A split follows the same attention as one call with a mask over the whole sequence "
                    f"(a (batch, 1, {length}, {length}) bool tensor, or flex attention's BlockMask, built before the "
                    "blocks and passed to each block): give the blocks that mask and a processor that makes the one "
                    "masked call (where the model ships a flex attention processor, set it: "
                    "model.set_attn_processor(...))"
                )
            keys_only = {} if self.retried else self.keys_only_inputs()
            if keys_only:
                raise _KeysOnly(keys_only)
        children = self.whole_children_inputs(mixed) if self.whole_children and (self.fixed or mixed) else {}
        if children:
            raise _WholeChildren(children, str(self.mixing_error(mixed)))
        if self.fixed:
            raise self.mixing_error(mixed)
        for x, name in zip(fakes, names):
            for dim, size in enumerate(x.shape if isinstance(x, torch.Tensor) else ()):
                cut = self.sliced.get(self.expr(size))
                if cut is not None:
                    raise ProbeError(
                        f"{self.where}: input '{name}' (dim {dim}, {expr_hint(self.env, self.expr(size))} long) is sliced "
                        f"to the token count {cut} inside the block, so it holds more positions than tokens; a split "
                        "cannot tell which of them each rank's tokens take"
                    )
        if mixed:
            raise self.mixing_error(mixed)
        inputs = tuple(self.dims(x, f"input '{name}'") for x, name in zip(fakes, names))
        sequences = list(dict.fromkeys(p for dims in inputs for d in dims for p in d.parts))
        attention = []
        for i, (q, k) in enumerate(self.calls):
            if i in self.grouped:  # per run, over keys every rank holds whole: local attention (``groups.py``)
                attention.append(((), ()))
                continue
            queries = self.parts(q, f"the queries of attention call {i}")
            keys = self.parts(k, f"the keys of call {i}", keys=True)
            if keys and not queries:
                raise ProbeError(
                    f"{self.where}: attention call {i} takes queries that are not tokens ({q}) over the split tokens "
                    f"{' + '.join(keys)}; a split can follow only attention whose queries are tokens"
                )
            attention.append((queries, keys))
        missing = sorted({p for call in attention for parts in call for p in parts if not is_selection(p)}
                         - set(sequences))
        if missing:
            raise ProbeError(
                f"{self.where}: its attention runs over tokens ({', '.join(missing)}) that no input carries, made "
                "inside the block; a split of its inputs cannot follow them"
            )
        outputs = tuple(self.dims(x, "an output", strict=False) for x in tree_leaves(output))
        reductions = tuple((i, next(d for d, length in dims if length.free_symbols & self.split))
                           for i, dims in self.sums if any(length.free_symbols & self.split for _, length in dims))
        counts = {count for _, count in self.grouped.values()}
        if any(e.free_symbols & counts for x in tree_leaves(output) if isinstance(x, torch.Tensor)
               for e in map(self.expr, x.shape)):
            raise ProbeError(f"{self.where}: an output is indexed by the runs its attention cuts the split tokens "
                             "into, not by the tokens; a split cannot follow it")
        groups = tuple(TokenGroups(str(length), tuple(
            (i, dim) for i, x in enumerate(fakes) if isinstance(x, torch.Tensor)
            for dim, size in enumerate(x.shape) if self.expr(size) == count))
            for length, count in dict.fromkeys(self.grouped.values()))
        fixed = tuple((i, dim, int(size)) for i, x in enumerate(fakes) if isinstance(x, torch.Tensor)
                      for dim, size in enumerate(self.expr(n) for n in x.shape) if not size.free_symbols)
        return BlockRoles(tuple(inputs), tuple(attention), tuple(sequences), outputs, reductions=reductions,
                          groups=groups, fixed=fixed)
