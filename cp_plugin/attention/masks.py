"""The attention masks diffusers models build, in the forms context-parallel attention can carry.

Context-parallel attention holds a shard of the queries and sees the keys block by block, so a mask
must be expressible per key (a key-padding mask, O(S), travels with the keys) or be readable by every
rank over the whole sequence (a genuinely two-dimensional mask, read a tile of our rows and a block's
columns at a time).
What models pass, and what it becomes:

- key-padding masks ``(B, S)``, ``(B, 1, S)``, ``(B, 1, 1, S)`` and ``(B, H, 1, S)`` (the same for
  every head, as LTX broadcasts), boolean or additive (0 / -inf or a bias <= ``MASKED_BIAS``);
- joint masks ``(B, 1, L, L)`` over this rank's tokens that are an outer product of a validity vector
  with itself (HunyuanVideo 1.5, Chroma): carried in O(S) as the key mask (which columns any query
  attends) and the query rows that attend anything. SDPA gives a row that attends nothing an output
  of zero, which a later block may read: diffusers' Chroma drops the mask of its single-stream blocks
  when gradient checkpointing is on, so there the masked text tokens are keys again. The output of
  those rows is zeroed after attention, which is what SDPA gives, forward and backward;
- masks over the whole sequence ``(B or 1, 1, S, S)`` that a model builds before the split and passes
  to every block (SkyReels-V2's block-causal diffusion forcing): read a tile at a time
  (:class:`MaskTiles`), with a warning about the O(S^2) memory the model's own tensor takes, unless
  they too are an outer product. Flex attention's ``BlockMask`` and ``is_causal`` are read as tiles
  too, built from the mask's block tables or from positions: O(tile) memory, never O(S^2).
"""

from __future__ import annotations

import abc
import enum
import warnings
import weakref
from typing import Any

import numpy as np
import torch

# An additive bias at or below this gives a key exactly zero softmax weight in every float dtype
# (exp underflows below -746 in float64), as LTX's ``(1 - mask) * -10000`` does.
MASKED_BIAS = -1e4


def as_bool(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) from a boolean or additive one."""
    if mask.dtype == torch.bool:
        return mask
    masked = mask <= MASKED_BIAS
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            "context-parallel attention takes boolean masks or additive masks of 0 (attend) and -inf or <= "
            f"{MASKED_BIAS:g} (masked); got other bias values. Pass a key-padding mask instead of a bias"
        )
    return ~masked


def _one_for_all_heads(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` without its head dim (dim 1), which must be 1 or hold the same mask for every head."""
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError(
            f"context-parallel attention got an attn_mask of shape {shape} that differs between heads; cp_plugin "
            "supports one mask for all heads. Use the same mask for every head"
        )
    return mask[:, 0]


def outer_product(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(queries (B, L_q), keys (B, L_k))`` of a ``(B, L_q, L_k)`` mask that is ``valid_q x valid_k``, else ``None``."""
    keys, queries = mask.any(-2), mask.any(-1)
    return (queries, keys) if bool((mask == (queries[:, :, None] & keys[:, None, :])).all()) else None


def key_padding_mask(
    attn_mask: torch.Tensor, batch: int, queries: int, keys: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A mask over this rank's keys -> ``(keys (B, keys), query rows (B, queries) or None)``, bool, True = attend.

    The query rows are those of an outer product that attend some key (``None``: every row attends);
    see the module docstring.
    """
    shape = tuple(attn_mask.shape)
    mask = as_bool(attn_mask)
    if mask.dim() == 4:
        mask = _one_for_all_heads(mask, shape)
    rows = None
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() == 3 and mask.shape[1] == queries == keys:
        reduced = outer_product(mask)
        if reduced is None:
            raise ValueError(
                f"context-parallel attention got an attn_mask of shape {shape} over this rank's {keys} tokens that "
                "is not a key-padding mask (nor an outer product of one); a per-query mask must be built over the "
                "whole sequence before the split, so that every rank can take its rows"
            )
        rows, mask = reduced
    if mask.dim() != 2 or mask.shape[-1] != keys or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"context-parallel attention supports key-padding masks of shape (batch, keys), (batch, 1, keys), "
            f"(batch, 1, 1, keys) or (batch, heads, 1, keys), joint (batch, 1, L, L) outer products, and masks "
            f"over the whole sequence; got attn_mask of shape {shape} for {batch} x {keys} keys per rank"
        )
    return mask.expand(batch, keys), None if rows is None else rows.expand(batch, queries)


def whole_sequence_mask(
    attn_mask: torch.Tensor, length: int, padded: int
) -> tuple[torch.Tensor | None, MaskTiles | None, torch.Tensor | None]:
    """A mask over all ``length`` tokens -> ``(key_mask (B, padded), None, query rows (B, padded))`` for an outer
    product, else ``(None, tiles, None)``: the mask read a tile at a time (:class:`DenseTiles`).

    The sequence is padded to ``padded`` tokens: padded keys are masked; padded query rows attend the
    real keys (their outputs are trimmed off, but must not be NaN in the backward).
    """
    shape = tuple(attn_mask.shape)
    mask = as_bool(attn_mask)
    if mask.dim() == 4:
        mask = _one_for_all_heads(mask, shape)
    if mask.dim() != 3 or mask.shape[-2:] != (length, length):
        raise ValueError(
            f"context-parallel attention got attn_mask of shape {shape}, which covers neither this rank's keys nor "
            f"the whole sequence of {length} tokens ((batch, 1, {length}, {length}))"
        )
    extra = padded - length
    reduced = outer_product(mask)
    if reduced is not None:
        rows, keys = reduced
        pad = torch.nn.functional.pad
        return pad(keys, (0, extra), value=False), None, pad(rows, (0, extra), value=True)
    warnings.warn(
        f"context-parallel attention holds a {length} x {length} attention mask on every rank (O(S^2) memory): "
        "a key-padding mask costs O(S)",
        stacklevel=3,
    )
    return None, DenseTiles(mask), None


class Reach(enum.Enum):
    """How much of a tile a mask attends, decided on the host (from positions, or block tables read once)."""

    NONE = "none"  # no query attends any key: the tile is skipped
    ALL = "all"  # every query attends every key: the kernel runs without a mask
    SOME = "some"  # the tile's mask is made and applied


def _combined(parts: set[Reach]) -> Reach:
    """The reach of a tile made of parts that reach as ``parts`` do."""
    return parts.pop() if len(parts) == 1 else Reach.SOME


class MaskTiles(abc.ABC):
    """A mask over one stream's whole sequence of ``length`` tokens, read one tile of (queries, keys) at a time.

    Context-parallel attention never needs a two-dimensional mask whole: each attention kernel call
    takes its queries against a block of keys, so it asks for that tile, forward and again backward,
    and holds O(tile) of the mask instead of O(S^2) (a mask of 32K tokens is 1 GiB of booleans,
    and 4 GiB as the additive bias a kernel takes). A tile may reach past ``length`` into the
    padding that evens the sequence out over the ranks: padded keys are masked, and padded query
    rows attend the real keys (their outputs are trimmed off, but must not be NaN in the backward).
    A tile is ``(batch, queries, keys)``, one mask for every head, or ``(batch, heads, queries, keys)``
    where the mask has one per head (a ``BlockMask`` with a head dim): :meth:`for_heads` keeps the
    heads a rank holds after Ulysses' exchange.

    :meth:`reach` says, without reading the device, whether a tile attends nothing (it is skipped:
    most of a block-causal or block-sparse mask) or everything (no mask is made). Where it cannot
    tell, it says ``SOME``, which is always correct: the tile's mask is then made and applied.
    """

    def __init__(self, length: int, lead: tuple[int, ...]) -> None:
        self.length, self.lead = length, lead  # lead: (batch,) or (batch, heads)

    def for_heads(self, first: int, stop: int) -> MaskTiles:
        """The mask of heads ``first:stop`` only (itself where one mask serves every head)."""
        return self

    def tile(self, rows: tuple[int, int], cols: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``(*lead, rows, cols)`` bool, True = attend, for queries ``rows[0]:rows[1]`` and keys ``cols[0]:cols[1]``."""
        (q0, q1), (k0, k1) = rows, cols
        real_q, real_k = min(q1, self.length), min(k1, self.length)
        if (real_q, real_k) == (q1, k1):
            return self.real(q0, q1, k0, k1, device)
        out = torch.zeros(*self.lead, q1 - q0, k1 - k0, dtype=torch.bool, device=device)
        if k0 < real_k:
            if q0 < real_q:
                out[..., : real_q - q0, : real_k - k0] = self.real(q0, real_q, k0, real_k, device)
            out[..., max(real_q, q0) - q0 :, : real_k - k0] = True
        return out

    def reach(self, rows: tuple[int, int], cols: tuple[int, int]) -> Reach:
        """Whether the tile of queries ``rows`` and keys ``cols`` attends nothing, everything or some of its keys."""
        (q0, q1), (k0, k1) = rows, cols
        real_q, real_k = min(q1, self.length), min(k1, self.length)
        if k0 >= real_k:
            return Reach.NONE  # padded keys only: masked for every query
        parts = set()
        if q0 < real_q:
            parts.add(self.real_reach(q0, real_q, k0, real_k))
        if q1 > real_q:
            parts.add(Reach.ALL)  # padded queries attend every real key
        if k1 > real_k:
            parts.add(Reach.NONE)  # padded keys are masked for every query
        return _combined(parts)

    def real_reach(self, q0: int, q1: int, k0: int, k1: int) -> Reach:
        """:meth:`reach` within the real tokens; ``SOME`` unless a subclass can tell more without reading the device."""
        return Reach.SOME

    @abc.abstractmethod
    def real(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        """The tile within the real tokens: ``(*lead, q1 - q0, k1 - k0)`` bool (any dim of size 1 broadcasts)."""


def _blocks(start: int, stop: int, size: int) -> slice:
    """The blocks of ``size`` tokens that tokens ``start:stop`` fall in."""
    return slice(start // size, -(-stop // size))


def _reach_of(listed: np.ndarray, full: np.ndarray | None) -> Reach:
    """The reach of a tile from its blocks: those that attend some key (``listed``) and those that attend all."""
    if full is not None and full.all():
        return Reach.ALL
    return Reach.SOME if listed.any() else Reach.NONE


# Rows and columns per block of a dense mask's host tables, which tell the tiles that attend nothing or everything.
DENSE_BLOCK = 128


def _dense_tables(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(listed, full)``: ``(B, row blocks, column blocks)`` host arrays, whether each ``DENSE_BLOCK``-square block of
    ``mask`` ``(B, S, S)`` attends some of its entries and whether it attends all; one read of the device."""
    batch, length = mask.shape[0], mask.shape[-1]
    pad = -length % DENSE_BLOCK
    listed, full = [], []
    for top in range(0, length, DENSE_BLOCK):  # a band of rows at a time: no copy of the whole mask
        band = mask[:, top: top + DENSE_BLOCK]
        for reduce, out, value in ((torch.any, listed, False), (torch.all, full, True)):
            columns = torch.nn.functional.pad(reduce(band, 1), (0, pad), value=value)
            out.append(reduce(columns.view(batch, -1, DENSE_BLOCK), -1))
    return torch.stack(listed, 1).cpu().numpy(), torch.stack(full, 1).cpu().numpy()


class DenseTiles(MaskTiles):
    """Tiles of a boolean ``(B or 1, S, S)`` mask the model built over the whole sequence (SkyReels-V2's
    block-causal diffusion forcing): the model holds it whole; no padded or additive copy of it is made.
    Which tiles attend nothing or everything comes from tables of its 128-square blocks, read once."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[-1], (mask.shape[0],))
        self.mask = mask
        self._tables: tuple[np.ndarray, np.ndarray] | None = None

    def real_reach(self, q0: int, q1: int, k0: int, k1: int) -> Reach:
        if self._tables is None:
            self._tables = _dense_tables(self.mask)
        region = (slice(None), _blocks(q0, q1, DENSE_BLOCK), _blocks(k0, k1, DENSE_BLOCK))
        listed, full = self._tables
        return _reach_of(listed[region], full[region])

    def real(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        return self.mask[:, q0:q1, k0:k1].to(device)


class CausalTiles(MaskTiles):
    """``is_causal`` over one stream's self-attention: query ``i`` attends keys ``0..i`` of the whole sequence."""

    def __init__(self, length: int) -> None:
        super().__init__(length, (1,))

    def real(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        return (torch.arange(q0, q1, device=device)[:, None] >= torch.arange(k0, k1, device=device)[None, :])[None]

    def real_reach(self, q0: int, q1: int, k0: int, k1: int) -> Reach:
        if k0 >= q1:
            return Reach.NONE  # every key after every query
        return Reach.ALL if k1 - 1 <= q0 else Reach.SOME


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is flex attention's ``BlockMask`` (checked by name: flex attention may be absent)."""
    return type(mask).__name__ == "BlockMask"


class BlockMaskTiles(MaskTiles):
    """Tiles of what flex attention's ``BlockMask`` lets each of the first ``length`` queries attend.

    A model builds the ``BlockMask`` over its whole sequence before the split (AnyFlow-FAR's
    frame-causal mask), padded to a multiple of its block size; ``length`` is the real sequence.
    flex attention applies ``mask_mod`` inside the partial blocks and attends every key of the full
    blocks, so a tile does the same: its blocks' entries (the mask's own O((S / block)^2) tables,
    read densely once) spread over the tile's tokens, and ``mask_mod`` on the tile's positions. A
    mask with a head dim (Kandinsky 6 SR's NABLA pattern, one per head) gives a tile per head.
    """

    def __init__(self, block_mask: Any, length: int, heads: tuple[int, int] | None = None) -> None:
        batch, mask_heads = block_mask.kv_num_blocks.shape[:2]
        self.heads = heads or (0, mask_heads)
        super().__init__(length, (batch,) if mask_heads == 1 else (batch, self.heads[1] - self.heads[0]))
        self.block_mask = block_mask
        self.partial, self.full = _block_tables(block_mask)

    def for_heads(self, first: int, stop: int) -> MaskTiles:
        if len(self.lead) == 1:
            return self
        return BlockMaskTiles(self.block_mask, self.length, (self.heads[0] + first, self.heads[0] + stop))

    def real_reach(self, q0: int, q1: int, k0: int, k1: int) -> Reach:
        rows, cols = self.block_mask.BLOCK_SIZE
        heads = slice(*self.heads) if len(self.lead) == 2 else slice(None)
        region = (slice(None), heads, _blocks(q0, q1, rows), _blocks(k0, k1, cols))
        listed, full = _host_tables(self.block_mask)
        return _reach_of(listed[region], None if full is None else full[region])

    def real(self, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_mask, noop_mask

        rows, cols = self.block_mask.BLOCK_SIZE
        first_row, first_col = q0 // rows * rows, k0 // cols * cols
        heads = slice(*self.heads) if len(self.lead) == 2 else slice(None)

        def spread(table: torch.Tensor) -> torch.Tensor:  # the tile's blocks, each repeated over its tokens
            blocks = table[:, heads, first_row // rows: -(-q1 // rows), first_col // cols: -(-k1 // cols)].to(device)
            tokens = blocks.repeat_interleave(rows, 2).repeat_interleave(cols, 3)
            return tokens[:, :, q0 - first_row: q1 - first_row, k0 - first_col: k1 - first_col]

        allowed = spread(self.partial)
        mask_mod = self.block_mask.mask_mod
        if mask_mod is not None and mask_mod is not noop_mask:  # NABLA's lists its blocks only
            first_head = self.heads[0] if len(self.lead) == 2 else 0

            def shifted(b: Any, h: Any, q: Any, kv: Any) -> Any:
                return mask_mod(b, h + first_head, q + q0, kv + k0)

            allowed &= create_mask(shifted, *allowed.shape[:2], q1 - q0, k1 - k0, device)
        if self.full is not None:
            allowed |= spread(self.full)
        return allowed if len(self.lead) == 2 else allowed[:, 0]


# Each BlockMask's tables of blocks, dense: a model passes one mask to every block, and a recompute passes it again.
_TABLES: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor | None]] = weakref.WeakKeyDictionary()


def _block_tables(block_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(partial, full)``: ``(B, H, query blocks, key blocks)`` bool, which blocks each query block reaches
    (through ``mask_mod``) and which it attends whole (``None``: no full blocks)."""
    if block_mask not in _TABLES:
        from torch.nn.attention.flex_attention import BlockMask

        def table(num_blocks: torch.Tensor | None, indices: torch.Tensor | None) -> torch.Tensor | None:
            if num_blocks is None:
                return None
            return BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=block_mask.BLOCK_SIZE).to_dense().bool()

        _TABLES[block_mask] = (table(block_mask.kv_num_blocks, block_mask.kv_indices),
                               table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    return _TABLES[block_mask]


# Each BlockMask's ``(listed, full)`` tables on the host, read from the device once: which tiles to skip or leave unmasked.
_HOST_TABLES: weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray | None]] = weakref.WeakKeyDictionary()


def _host_tables(block_mask: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(listed, full)``: ``(B, H, query blocks, key blocks)`` host arrays, the blocks each query block reaches
    (partly or whole) and those it attends whole (``None``: no full blocks)."""
    if block_mask not in _HOST_TABLES:
        partial, full = _block_tables(block_mask)
        listed = partial if full is None else partial | full
        _HOST_TABLES[block_mask] = (listed.cpu().numpy(), None if full is None else full.cpu().numpy())
    return _HOST_TABLES[block_mask]
