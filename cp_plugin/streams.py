"""A derived plan at run time: split the token streams where they enter the blocks, gather after the last.

At every block's entry, its inputs are split by their roles, which a symbolic probe of that block
finds (``probe.py``, once per block class and input structure): which inputs index tokens, along
which dimension, and which token sequences. A sequence the block takes attention queries from is a
*stream*, split over the CP group; so is a sequence of keys concatenated with one. A sequence that
only gives keys and values (the text of cross-attention) stays whole: each rank's queries attend all
of it. Names and sizes decide nothing, so streams enter under any keyword or position (image and
caption refiners, control blocks), and a rotary table of 16 tokens and head dim 16 is split along
its tokens.

Each sequence of a block is bound to streams:

- an input this forward already split (a previous block's output, or something the model computed
  from one: every op outside the blocks that reads a split tensor gives a split tensor) binds its
  sequence to the streams it holds, told by its local length (``padding.py`` keeps them distinct);
- otherwise the first input holding the sequence whole names a new stream, and is split.

Every other whole input indexing a stream is split along that dimension: one stream's shard, or a
joint sequence part by part in the block's order (a concatenation inside the block shows it, see
``probe.py``; a concatenation the model made between blocks is seen there, see ``locality.py``). A
``(queries, keys)`` mask over a whole stream stays whole: the attention takes this rank's rows. A
split input whose tokens this block takes as keys only is gathered for it, and so are split tokens
that an attention layer inside the block takes as keys only and cuts by a count (Motif-Video's
image-to-video cross-attention keys, ``encoder_hidden_states[:, 3:]``), where they enter that layer:
the cut then runs on the whole sequence, as on one process. So does a child of the block without
attention that cuts split tokens by a count (NucleusMoE's expert-choice routing: each expert takes its
top tokens of the whole sequence): its token inputs are gathered where they enter it and this rank's
rows taken of what it returns, so every rank runs it whole (its compute and activations are not
divided by the CP size). Sequences the CP size does not divide are padded and masked.

The last block of a forward (the one that completes the count of blocks, remembered for later
forwards and activation-checkpoint recomputes) ends the split region: the model's other children
called after it (its output norms and projections) gather the split tensors they are given, so
everything from there on runs on whole sequences, as on one process. A class whose code between two block
lists cannot run on split tokens (``plans.GATHERED_AFTER``) also ends a split region at the last block of the
earlier list: its outputs are gathered, and the next list splits the whole sequences it is given anew.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from cp_plugin.attention.dispatch import AttentionCall, AttentionRouting, RoutedParallelConfig
from cp_plugin.compat import tree_flatten, tree_flatten_with_path, tree_unflatten
from cp_plugin.grid import HaloGrid, grid_radius
from cp_plugin.groups import enter_runs, exit_runs
from cp_plugin.locality import Locality
from cp_plugin.plans import PLAN_HINT
from cp_plugin.probe import BlockRoles, Parts, ProbeError, TokenDim, is_selection, probe_block
from cp_plugin.reductions import TokenReductions
from cp_plugin.sequence import gather_sequence, local_shard

# Probe results, by block structure and input structure: a block class with the same submodules,
# weight shapes and processors relates its inputs the same way in every model instance.
# Per block kind, its probed roles: several where the block's code fixes input sizes (``BlockRoles.fixed``), each
# with the whole sizes it was probed at where its scales were computed from token counts (``BlockRoles.scales``)
_ROLES: dict[Any, list[tuple[BlockRoles, tuple | None]]] = {}


def _structure(block: torch.nn.Module) -> tuple:
    """What a block's data flow depends on: its submodules, their weights' shapes and attention processors."""
    return tuple(
        (name, type(m).__qualname__, type(getattr(m, "processor", None)).__qualname__,
         tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)))
        for name, m in block.named_modules()
    )


def _probed_at(leaves: list[Any], shapes: list[tuple[int, ...] | None]) -> tuple:
    """The whole sizes and plain values of a block's inputs: what numbers its code reads can come from."""
    return tuple(
        (shape or tuple(x.shape)) if isinstance(x, torch.Tensor)
        else x if isinstance(x, (int, float, bool, str, type(None))) else type(x)
        for x, shape in zip(leaves, shapes)
    )


class StreamState:
    """What one forward of one model has split so far, shared by its hooks; the block roles are kept."""

    def __init__(self, model: str, total_blocks: int, config: RoutedParallelConfig, routing: AttentionRouting) -> None:
        self.model, self.total_blocks, self.config, self.routing = model, total_blocks, config, routing
        self.call = AttentionCall(config, self)  # what a block's attention calls are routed by
        self.padding, self.mesh = config.padding, config.cp_mesh
        self.calls, self.last_block = 0, None
        self.running: list[tuple[BlockRoles, Iterator[int]]] = []  # the blocks running now, innermost last
        self.reset()

    def reset(self) -> None:
        self.blocks_done = self.gathered = self.tracking = False
        self.local: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.token_dim: dict[int, int] = {}  # id of a split tensor -> the dimension that holds its tokens
        self.splits: dict[tuple[int, int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.gathers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_name = "the first block"  # the block that ran last, for names and messages

    def is_local(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and self.local.get(id(x)) is x

    def mark_local(self, x: torch.Tensor, dim: int | None) -> torch.Tensor:
        self.local[id(x)] = x
        if dim is not None:
            self.token_dim[id(x)] = dim
        return x

    def next_attention(self, scale: Any = None) -> tuple[tuple[Parts, Parts] | None, Any]:
        """The (queries, keys) streams of the attention call the running block makes now, in order (a part the
        block selected by data from whole tokens stays named as the probe's selection, ``probe.is_selection``), and
        the scale it takes: the block's own ``scale``, or one process's where the block computes it from a token
        count (``BlockRoles.scales``), which this rank reads as its own share."""
        if not self.running:
            return None, scale
        roles, counter, streams = self.running[-1]
        index = next(counter)
        if index >= len(roles.attention):
            return None, scale
        queries, keys = roles.attention[index]
        found = tuple(tuple(s for p in parts for s in ((p,) if is_selection(p) else streams[p]))
                      for parts in (queries, keys))
        return found, dict(roles.scales).get(index, scale)  # type: ignore[return-value]

    def new_stream(self, name: str, length: int) -> str:
        """Register a stream of ``length`` tokens under ``name`` (made unique) in this forward; its name."""
        stream, n = name, 1
        while stream in self.padding.lengths and self.padding.lengths[stream] != length:
            n += 1
            stream = f"{name} ({n})"
        self.padding.register(stream, length, self.model)
        return stream

    def shard(self, x: torch.Tensor, dim: int, order: tuple[str, ...]) -> torch.Tensor:
        """This rank's part of a whole ``x`` that holds the streams ``order`` along ``dim`` (each padded), split."""
        padding = self.padding
        cached = self.splits.get((id(x), dim, order))
        if cached is not None:
            return cached[1]
        lengths = [padding.lengths[s] for s in order]
        parts = x.split(lengths, dim) if len(order) > 1 else (x,)
        shards = [local_shard(padding.pad_to_split(p, dim, n), dim, self.mesh, name=f"{self.model} tokens")
                  for p, n in zip(parts, lengths)]
        local = shards[0] if len(shards) == 1 else torch.cat(shards, dim)
        self.splits[id(x), dim, order] = (x, local)
        return self.mark_local(local, dim)

    def gather(self, x: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        """The whole tensor of split ``x``: every rank's part, the streams in order, without padding."""
        cached = self.gathers.get((id(x), dim))
        if cached is not None:
            return cached[1]
        whole = self._gather(x, dim, where)
        self.gathers[id(x), dim] = (x, whole)
        return whole

    def _gather(self, x: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        padding, mesh = self.padding, self.mesh
        order = padding.composition(x.shape[dim])
        if order is None:
            raise ValueError(f"{self.model}: {where} gets {x.shape[dim]} split tokens along dim {dim}, which are no "
                             f"stream's share nor a known concatenation of them; {PLAN_HINT}")
        if self.blocks_done:
            self.gathered = True
        gathered = gather_sequence(x, dim, mesh)
        if len(order) == 1:
            return gathered.narrow(dim, 0, padding.lengths[order[0]])
        local = [padding.local_stream(s) for s in order]
        per_rank = gathered.unflatten(dim, (mesh.cp_size, sum(local))).split(local, dim + 1)
        return torch.cat([p.flatten(dim, dim + 1).narrow(dim, 0, padding.lengths[s]) for p, s in zip(per_rank, order)],
                         dim)


class BlockStreams(ModelHook):
    """Around every block of a derived plan: split its whole inputs by their roles, route its attention."""

    def __init__(self, state: StreamState, name: str, ends_split: bool = False) -> None:
        super().__init__()
        self.state, self.name = state, name
        self.ends_split = ends_split  # the last block of a list the plan gathers after (``plans.GATHERED_AFTER``)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.params = list(inspect.signature(module.forward).parameters)
        self.structure: tuple | None = None
        self.where = f"{self.state.model} block '{self.name}' ({type(module).__name__})"
        self.radius = grid_radius(module, self.where)  # > 0: it convolves its tokens on their grid
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        state.routing.enter(state.call)  # also around the probe, and in an activation checkpoint's recompute
        try:
            tracking, state.tracking = state.tracking, False
            try:
                args, kwargs, roles, streams = self._enter(module, args, kwargs)
                cuts = None
                if roles.groups:  # attention per run of tokens: the runs this rank's tokens touch (groups.py)
                    leaves, spec = tree_flatten((args, kwargs))
                    leaves, cuts = enter_runs(roles, leaves, state.padding, state.mesh.cp_rank, self.where)
                    args, kwargs = tree_unflatten(leaves, spec)
            finally:
                state.tracking = tracking
            state.running.append((roles, itertools.count(), streams))
            state.padding.in_blocks += 1
            try:
                with self._block_ops(module, roles):
                    output = self.fn_ref.original_forward(*args, **kwargs)
                if cuts is not None:
                    leaves, spec = tree_flatten(output)
                    output = tree_unflatten(exit_runs(roles, leaves, cuts), spec)
            finally:
                state.padding.in_blocks -= 1
                state.running.pop()
        finally:
            state.routing.exit()
        return self._exit(module, output, roles)

    def _block_ops(self, module: torch.nn.Module, roles: BlockRoles) -> contextlib.ExitStack:
        """The block's own ops that the split must follow: grid reshapes (halos), sums over tokens, split tokens
        an attention layer takes as keys only and cuts by a count, gathered where they enter it, and a child without
        attention that cuts split tokens by a count, run on its inputs gathered and giving back this rank's rows."""
        stack, state = contextlib.ExitStack(), self.state
        if roles.grid is not None and roles.grid.entries:
            stack.enter_context(HaloGrid(roles.grid, state.padding, state.mesh, self.radius, self.where))
        if roles.reductions:
            stack.enter_context(TokenReductions(roles.reductions, state.padding, state.mesh))
        for path, entries in itertools.groupby(roles.gathered, key=lambda entry: entry[0]):
            layer = module.get_submodule(path)
            wanted = [(index, dim) for _, index, dim in entries]
            rows = [(index, dim) for at, index, dim in roles.localized if at == path]
            orders: list[dict[int, tuple[str, ...]]] = []  # per call running, whole length -> the streams it holds
            where = f"{self.where}'s layer '{path}'"

            def gather(layer: torch.nn.Module, args: tuple, kwargs: dict, wanted: list = wanted, where: str = where,
                       rows: list = rows, orders: list = orders) -> tuple[tuple, dict]:
                leaves, spec = tree_flatten((args, kwargs))
                held = {}
                for index, dim in wanted:
                    order = state.padding.composition(leaves[index].shape[dim])
                    leaves[index] = state.gather(leaves[index], dim, where)
                    held[leaves[index].shape[dim]] = order
                if rows:  # what this rank's rows of the child's outputs will be taken from
                    orders.append(held)
                return tree_unflatten(leaves, spec)

            def take_rows(layer: torch.nn.Module, args: tuple, output: Any, rows: list = rows, orders: list = orders
                          ) -> Any:
                held = orders.pop()
                if output is None:  # the child raised (a hook that always runs): nothing to take rows of
                    return None
                leaves, spec = tree_flatten(output)
                for index, dim in rows:
                    leaves[index] = state.shard(leaves[index], dim, held[leaves[index].shape[dim]])
                return tree_unflatten(leaves, spec)

            stack.callback(layer.register_forward_pre_hook(gather, with_kwargs=True).remove)
            if rows:  # a child run whole (an attention layer's keys-only inputs give back this rank's queries' rows)
                stack.callback(layer.register_forward_hook(take_rows, always_call=True).remove)
        return stack

    # entry ------------------------------------------------------------------------------------
    def _names(self, args: tuple, kwargs: dict) -> list[str]:
        """A readable name per flattened input: the parameter, then the place inside it."""
        names = []
        for path, _ in tree_flatten_with_path((args, kwargs))[0]:
            head, rest = path[1], path[2:]
            name = self.params[head.idx] if path[0].idx == 0 and head.idx < len(self.params) else str(
                getattr(head, "key", getattr(head, "idx", head)))
            names.append(name + "".join(str(p) for p in rest))
        return names

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict
               ) -> tuple[tuple, dict, BlockRoles, dict[str, tuple[str, ...]]]:
        state = self.state
        leaves, spec = tree_flatten((args, kwargs))
        names = self._names(args, kwargs)
        if self.structure is None:
            self.structure = _structure(module)
        key = (type(module), self.structure, spec,
               tuple((x.dim(), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in leaves))
        shapes = [self._whole_shape(x) if state.is_local(x) else None for x in leaves]
        whole = [s or (tuple(x.shape) if isinstance(x, torch.Tensor) else None) for s, x in zip(shapes, leaves)]
        here = _probed_at(leaves, shapes)
        # (roles, where they were probed when their scales were computed from token counts, which hold there only)
        known = _ROLES.setdefault(key, [])
        roles = next((r for r, at in known if r.fit(whole) and at in (None, here)), None)
        if roles is None:
            try:
                roles = probe_block(self.fn_ref.original_forward, args, kwargs, names, self.where, shapes,
                                    grid=self.radius > 0)
            except ProbeError as err:
                raise ValueError(f"{err}; {PLAN_HINT}") from err
            known.append((roles, here if roles.scales else None))
        streams = self._bind(roles, leaves, names)
        split = [self._split(x, dims, streams, name) for x, dims, name in zip(leaves, roles.inputs, names)]
        new_args, new_kwargs = tree_unflatten(split, spec)
        return new_args, new_kwargs, roles, streams

    def _whole_shape(self, x: torch.Tensor) -> tuple[int, ...] | None:
        """A split input's shape on one process: its token dimension as long as the streams it holds."""
        dim = self.state.token_dim.get(id(x))
        if dim is None:
            return None
        shape = list(x.shape)
        shape[dim] = sum(self.state.padding.lengths[s] for s in self._composition(x, dim))
        return tuple(shape)

    def _bind(self, roles: BlockRoles, leaves: list[Any], names: list[str]) -> dict[str, tuple[str, ...]]:
        """Each token sequence of the block -> the streams it is: from split inputs, else new streams."""
        state, padding = self.state, self.state.padding
        streams: dict[str, tuple[str, ...]] = {}
        for x, dims in zip(leaves, roles.inputs):
            if state.is_local(x):
                for d in dims:
                    if len(d.parts) == 1 and d.parts[0] not in streams:
                        streams[d.parts[0]] = self._composition(x, d.dim)
        for sequence in roles.sequences:
            if sequence in streams:
                continue
            found = next(((x, d, name) for x, dims, name in zip(leaves, roles.inputs, names) if not state.is_local(x)
                          for d in dims if d.parts == (sequence,)), None)
            if found is None:
                raise ValueError(
                    f"{state.model}: block '{self.name}' takes a token sequence only as part of joint inputs, never "
                    f"on its own, so the stream to split is unknown; {PLAN_HINT}"
                )
            x, d, name = found
            streams[sequence] = (state.new_stream(f"{self.name.rsplit('.', 1)[0]}.{name}", x.shape[d.dim]),)
        joint = [d.parts for dims in roles.inputs for d in dims] + [p for call in roles.attention for p in call]
        for parts in joint:
            order = tuple(s for p in parts if not is_selection(p) for s in streams[p])
            if len(order) > 1:
                padding.set_joint_order(order, f"{state.model} block '{self.name}'")
        return streams

    def _composition(self, x: torch.Tensor, dim: int) -> tuple[str, ...]:
        """The streams a split input holds along ``dim``, told by its local length and the joint orders seen."""
        padding = self.state.padding
        found = padding.composition(x.shape[dim])
        if found is None:
            raise ValueError(
                f"{self.state.model}: block '{self.name}' gets {x.shape[dim]} split tokens along dim {dim}, which is "
                f"neither one stream's share ({padding.local_shares()}) "
                f"nor a concatenation of them in an order the model showed; {PLAN_HINT}"
            )
        return found

    def _split(self, x: Any, dims: tuple[TokenDim, ...], streams: dict[str, tuple[str, ...]], name: str) -> Any:
        state, padding = self.state, self.state.padding
        if state.is_local(x) and not dims and id(x) in state.token_dim:
            # Split earlier (by a block list that takes queries from it), keys only here: every rank needs it whole.
            return state.gather(x, state.token_dim[id(x)], f"block '{self.name}' input '{name}'")
        if not dims or not isinstance(x, torch.Tensor) or state.is_local(x):
            return x
        if len(dims) == 2 and [d.dim for d in dims] == [x.dim() - 2, x.dim() - 1]:
            return x  # a (queries, keys) mask over whole streams: the attention takes this rank's rows
        if len(dims) > 1:
            raise ValueError(
                f"{state.model}: block '{self.name}' input '{name}' of shape {tuple(x.shape)} indexes tokens along "
                f"dims {[d.dim for d in dims]}; cp_plugin splits one dimension per input (or keeps a (queries, keys) "
                f"mask whole); {PLAN_HINT}"
            )
        dim, order = dims[0].dim, tuple(s for p in dims[0].parts for s in streams[p])
        full = sum(padding.lengths[s] for s in order)
        if x.shape[dim] != full:
            raise ValueError(
                f"{state.model}: block '{self.name}' input '{name}' of shape {tuple(x.shape)} indexes the tokens of "
                f"{' + '.join(order)} along dim {dim}, which are {full} in this forward; {PLAN_HINT}"
            )
        return state.shard(x, dim, order)

    # exit -------------------------------------------------------------------------------------
    def _exit(self, module: torch.nn.Module, output: Any, roles: BlockRoles) -> Any:
        state = self.state
        leaves, spec = tree_flatten(output)
        for t, dims in zip(leaves, itertools.chain(roles.outputs, itertools.repeat(()))):
            if isinstance(t, torch.Tensor) and dims:  # outputs indexed by split tokens are split
                state.mark_local(t, dims[0].dim)
        if self.ends_split:  # the model's code after this list runs on whole sequences, as on one process
            tracking, state.tracking = state.tracking, False
            try:
                output = tree_unflatten([state.gather(t, state.token_dim[id(t)], f"the end of '{self.name}'")
                                         if state.is_local(t) and id(t) in state.token_dim else t for t in leaves],
                                        spec)
            finally:
                state.tracking = tracking
        state.last_name = self.name
        if state.last_block is None:
            state.calls += 1
            if state.calls == state.total_blocks:
                state.last_block = module
        if module is state.last_block:
            state.blocks_done = True
        return output


class OutputGather(ModelHook):
    """On the model's other children: those called after the last block gather their split inputs.

    That is the output norm or projection in every DiT: what the forward does between the last
    block and it (adding Wan VACE's last control hint, concatenating CogVideoX's text and image for
    its final norm, slicing Chroma's text off) is per token and runs on the shards; what follows
    runs on whole sequences, as on one process. A joint input is put back in order.
    """

    def __init__(self, state: StreamState, name: str) -> None:
        super().__init__()
        self.state, self.name = state, name

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state = self.state
        if not state.blocks_done:
            return args, kwargs
        tracking, state.tracking = state.tracking, False
        try:
            leaves, spec = tree_flatten((args, kwargs))
            args, kwargs = tree_unflatten([self._gather(x) for x in leaves], spec)
        finally:
            state.tracking = tracking
        return args, kwargs

    def _gather(self, x: Any) -> Any:
        state = self.state
        if not state.is_local(x):
            return x
        dim = state.token_dim.get(id(x))
        if dim is None:
            raise ValueError(f"{state.model}: '{self.name}' gets a split input of shape {tuple(x.shape)} after the "
                             f"blocks whose token dimension is unknown; {PLAN_HINT}")
        return state.gather(x, dim, f"'{self.name}'")


class ForwardScope(ModelHook):
    """Around a derived-plan model's forward: a fresh split state, split tensors followed between blocks,
    and a check that the streams came back whole."""

    def __init__(self, state: StreamState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        state.reset()
        state.padding.reset()
        state.tracking = True
        try:
            with Locality(state):
                output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.tracking = False
        if not state.padding.lengths:
            raise ValueError(
                f"{state.model}: none of its blocks takes attention queries from a token sequence that a split can "
                "follow (its tokens are reshaped into a grid, its attention reads the token count as a number, or it "
                f"is computed without SDPA or dispatch_attention_fn), so context parallelism would split nothing; "
                f"{PLAN_HINT}"
            )
        if not state.gathered:
            raise RuntimeError(
                f"{state.model} ran fewer of its {state.total_blocks} blocks in this forward than in its first, so "
                f"its split token streams were never gathered; run every block in every forward (e.g. no "
                f"skip_layers) or {PLAN_HINT}"
            )
        return output
