"""Verified diffusers DiTs train under context parallelism exactly as on one process.

Models without a ``_cp_plan`` train on the plan cp_plugin derives (the probe of each block, its
streams split where they enter, ``cp_plugin/streams.py``), the others on their own; nothing in the
model code or the training loop changes. Each model is fed what its pipeline gives: odd text
lengths (padded and masked on 2 and 4 ranks) with part of one sample's text masked where the model
takes a text mask, and image/video token counts the CP size often does not divide. The default
suite trains the share named below, one launch per world size; ``python -m benchmarks.every_dit``
trains every case of ``fixtures/dits`` and writes the errors the support table is built from.

Losses, first-step gradients (all of them, against the largest: a gradient the model gives exactly
zero, such as a key bias's, is rounding noise) and weight *updates* (a skipped or wrong step changes
them by a third or more) must match. Mutations of the plan (a split along a dimension of the same
size, a reversed joint order) must make these checks, or the plan's own, fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dits_exact import SGD_LR, STEPS, flex_as_sdpa, lightning_train_many, train, train_many
from exact import assert_update_close, update_error
from launcher import run_distributed

# Measured (fp32, gloo): losses within 2.2e-7, gradients within 3e-6 of the largest, SGD and AdamW
# updates within the weights' resolution.
LOSS_RTOL = GRAD_RTOL = UPDATE_RTOL = 1e-5
BOUNDS = {"loss": LOSS_RTOL, "gradient": GRAD_RTOL, "update": UPDATE_RTOL}  # what check() holds errors() to
OPTIMIZERS = ("sgd", "adamw")
TWO_RANKS = [{"ulysses_degree": 2}, {"ring_degree": 2}]
FOUR_RANKS = [{"ring_degree": 2, "ulysses_degree": 2}, {"dp_degree": 2, "ring_degree": 2}]
FOUR_RANK_MODELS = ("sd3", "hunyuanvideo")
# The default suite's share of the sweep (python -m benchmarks.every_dit runs every case of fixtures/dits): sixteen
# classes of the common kinds (joint or cross attention to text, own and derived plans, SDPA called directly, masks
# of every form, unused parameters), and cases that each stand for a mechanism: second sizes whose token counts equal head
# dims (Chroma's joint rotary table, SkyReels-V2's per-frame modulation, Flux and Wan on their own plans), refiners
# (Z-Image, Lumina 2: samples packed between blocks), text self-attended then attended as keys (Kandinsky 5),
# tokens joined and cut between blocks (HiDream, Krea 2), grouped key/value heads (ACE-Step), a rotary table
# sliced inside blocks (Stable Audio 3), a convolution after the blocks (DreamLite), own plans cp_plugin replaces
# or extends (LTX-2, Helios), causal self-attention (MiniMax Music 3's depth decoder), convolutions over the token
# grid with linear attention (Sana: a padded 3 x 5 grid; Sana-Video: frames, a temporal convolution, a sum of keys),
# a whole-sequence causal mask that prepare_attention_mask would pad to this rank's token count (the unCLIP prior),
# a split that ends after a refiner whose outputs the model measures (BriaFibo2), attention per latent frame against
# keys every rank holds (Wan-Animate's face adapter, its frames cut mid-way by the split), text selected per sample by
# its mask beside the split video (Mochi), image-context tokens cut off a split stream by a count inside a
# cross-attention layer that takes them as keys only (Motif-Video's image-to-video: gathered where they enter it),
# an expert-choice MoE that takes each expert's top tokens of the whole sequence (NucleusMoE: run on it gathered), and
# flex attention's BlockMask built over the whole sequence, the tokens padded to its block size in the processor
# (AnyFlow-FAR's frame-causal mask, zeros appended; Qwen-Image 2.1's block-causal one through its flex processor,
# F.pad to the rounded length, trains in the mutation check below and in the sweep), and keys of a fixed count from a
# KV cache beside the split keys (SANA-WM's refiner: attention-sink and history keys, held alike by every rank), and a
# BlockMask a processor builds per head from statistics of its queries and keys (Kandinsky 6 SR's NABLA: taken over
# the whole sequence, each rank's heads under Ulysses).
COMMON = ("sd3", "cogvideox", "hunyuanvideo", "hunyuanvideo15", "wan_vace", "skyreels_v2", "chroma", "ltx", "qwenimage",
          "pixart", "auraflow", "cogview4", "hunyuanimage", "flux2", "cosmos", "stableaudio")
MECHANISMS = ("chroma:second", "skyreels_v2:second", "flux:second", "wan:second", "zimage", "lumina2", "kandinsky5",
              "hidream", "krea2", "acestep", "stableaudio3", "dreamlite", "ltx2", "helios", "minimax_music3_depth", "sana",
              "sana_video", "prior", "bria_fibo2", "wan_animate", "mochi", "motif_video:second",
              "nucleusmoe", "anyflow_far:second", "sana_wm_refiner:second", "kandinsky6_sr")
# A mechanism is about where the split goes, which the optimizer does not change: those cases train with SGD only,
# which shows a wrong gradient scale that AdamW would hide (python -m benchmarks.every_dit runs both for every class).
# AdamW trains the memory options' models and these common ones: SDPA called directly (SD3), a joint (B, 1, S, S)
# mask with unused parameters (HunyuanVideo 1.5), an own plan with unused parameters (QwenImage), a (B, H, 1, S) mask
# (LTX).
ADAMW_COMMON = ("sd3", "hunyuanvideo15", "qwenimage", "ltx")


def errors(result: dict[str, Any], reference: dict[str, Any], optimizer: str) -> dict[str, tuple[float, str]]:
    """The worst loss, gradient and update errors of a run against one process, each in units of its scale, with
    where it is: the loss relative to the reference's, gradients relative to the largest gradient, and each
    parameter's update relative to its own update (beyond the weights' resolution; by norm under AdamW).

    AdamW's updates are compared by their norm: its first steps are about ``lr * sign(grad)``, so an
    entry whose gradient is at the rounding noise can move by up to ``2 lr`` where the reference's
    does not (measured: 2.3e-5 of Z-Image's largest timestep-embedding update, 1.4e-6 of its norm); a
    skipped or wrong step changes the norm by a third or more. SGD's are compared entry by entry.

    Gradients agree to ``GRAD_RTOL`` of the largest one; AdamW divides each entry by its own size,
    so a parameter whose gradients are a fraction of the largest has its update known to that
    tolerance over the fraction (capped at a tenth: a skipped step still shows). A parameter whose
    gradient is within the gradient tolerance of zero (the bias of a key norm: softmax ignores a
    shift shared by every key) has a rounding-noise gradient: under SGD its update may differ by that
    tolerance carried through the steps; AdamW scales the noise to ``lr``-sized steps of either sign,
    so its update says nothing there.
    """
    losses = [(abs(got - want) / abs(want), f"step {step} loss {got} != {want}")
              for step, (got, want) in enumerate(zip(result["losses"], reference["losses"], strict=True))]
    if set(result["grads"]) != set(reference["grads"]):
        return {"loss": max(losses), "gradient": (float("inf"), "different parameters got gradients"),
                "update": (float("inf"), "updates of different parameters")}
    largest = max(float(g.abs().max()) for g in reference["grads"].values())
    grads = [(float((result["grads"][name] - want).abs().max()) / largest, f"gradient of {name}")
             for name, want in reference["grads"].items()]
    noise = GRAD_RTOL * largest  # a first-step gradient this small is zero to the gradient check
    updates = [(0.0, "no update")]
    for name, before in reference["before"].items():
        if not torch.equal(result["before"][name], before):
            updates.append((float("inf"), f"{name}, which started from other weights"))
            continue
        own = float(reference["grads"][name].abs().max()) if name in reference["grads"] else largest
        zero, adamw = own <= noise, optimizer == "adamw"
        if zero and adamw:
            continue
        err, scale, _ = update_error(result["after"][name], reference["after"][name], before, STEPS, norm=adamw,
                                     atol=SGD_LR * STEPS * noise if zero else 0.0)
        share = min(0.1 / UPDATE_RTOL, max(1.0, largest / own)) if adamw else 1.0
        updates.append((err / (scale * share) if scale else (float("inf") if err else 0.0), f"update of {name}"))
    return {"loss": max(losses), "gradient": max(grads), "update": max(updates)}


def check(result: dict[str, Any], reference: dict[str, Any], optimizer: str, what: str) -> None:
    """Losses, first-step gradients and every parameter's update match one process (the sweep's verdict too)."""
    for kind, (err, where) in errors(result, reference, optimizer).items():
        assert err <= BOUNDS[kind], f"{what}: {where} off by {err:.1e} of its scale (bound {BOUNDS[kind]:.0e})"


# Memory options (cp_plugin.memory) under every layout: the models' own gradient checkpointing (blocks recomputed
# under CP) with tiled feed-forward networks, and tiling alone, in chunks of 5 tokens so the tiny fixtures are cut.
# Flux and Wan on their own plans; Z-Image (refiners, samples packed between blocks), Chroma (a joint mask that
# diffusers drops from its single-stream blocks when checkpointing) and HunyuanVideo (its single-stream proj_out of
# the two streams' attention outputs and the inline MLP, taken in chunks) on derived plans. The reference checkpoints too
# (whole blocks): the save_attention policy, which keeps the attention kernels' outputs through a recompute, must
# train as a full recompute does.
MEMORY_MODELS = ("flux", "wan", "zimage", "chroma", "hunyuanvideo")
MEMORY = [{"gradient_checkpointing": True, "tiling": True, "tile_tokens": 5}, {"tiling": True, "tile_tokens": 5}]
SAVE_ATTENTION = {"gradient_checkpointing": True, "checkpoint_policy": "save_attention", "tiling": True, "tile_tokens": 5}
SAVE_ATTENTION_MODELS = ("flux", "zimage")
FOUR_RANK_MEMORY_MODELS = ("flux", "zimage")


def _cases(models: tuple[str, ...], layouts: list[dict[str, int]], memory: list[dict[str, Any] | None],
           optimizers: tuple[str, ...] = OPTIMIZERS) -> list[tuple]:
    return [(model, opt, layout, options) for model in models for opt in optimizers for layout in layouts
            for options in memory]


def _run(world: int, cases: list[tuple]) -> None:
    results = run_distributed(train_many, world, cases, timeout=600)
    references: dict[tuple, dict[str, Any]] = {}
    for i, (model, opt, layout, options) in enumerate(cases):
        checkpointing = bool(options and options.get("gradient_checkpointing"))
        key = (model, opt, checkpointing)
        if key not in references:
            references[key] = train(model, opt, None, {"gradient_checkpointing": checkpointing})
        for rank, rank_results in enumerate(results):
            check(rank_results[i], references[key], opt, f"{model} {opt} {layout} {options or ''} rank {rank}")


@pytest.mark.timeout(900)
def test_two_ranks_every_dit_matches_one_process() -> None:
    _run(2, _cases(COMMON, TWO_RANKS, [None], ("sgd",)) + _cases(ADAMW_COMMON, TWO_RANKS, [None], ("adamw",))
         + _cases(MECHANISMS, TWO_RANKS, [None], ("sgd",))
         + _cases(MEMORY_MODELS, TWO_RANKS, MEMORY)
         + _cases(SAVE_ATTENTION_MODELS, TWO_RANKS, [SAVE_ATTENTION]))


@pytest.mark.timeout(900)
def test_four_ranks_ring_ulysses_and_dp_match_one_process() -> None:
    _run(4, _cases(FOUR_RANK_MODELS, FOUR_RANKS, [None])
         + _cases(FOUR_RANK_MEMORY_MODELS, FOUR_RANKS[:1], MEMORY[:1]) + _cases(("flux",), FOUR_RANKS[:1], [SAVE_ATTENTION]))


LIGHTNING = [
    ("hunyuanvideo15", "adamw", {"ring_degree": 2}),  # no _cp_plan; its last text branch is unused (plain DDP raises)
    ("sd3", "sgd", {"ulysses_degree": 2, "fsdp": True}),  # a derived plan under FSDP2
    ("wan", "sgd", {"ring_degree": 2, "gradient_checkpointing": True, "tile_feed_forward": True, "tile_tokens": 5}),
    # an inline MLP's hidden layer recomputed from FSDP2's unsharded weights
    ("flux", "sgd", {"ulysses_degree": 2, "fsdp": True, "gradient_checkpointing": True, "tile_feed_forward": True,
                     "tile_tokens": 5}),
]


@pytest.mark.timeout(300)
def test_lightning_strategy_trains_derived_plans_unused_parameters_and_fsdp_with_no_other_options() -> None:
    """A plain LightningModule and ``ContextParallelStrategy(<degrees and memory options>)``, nothing else, trains as
    one process; the memory options are on while it trains and off once ``fit`` ends."""
    results = run_distributed(lightning_train_many, 2, LIGHTNING, init_process_group=False)
    for i, (model, opt, layout) in enumerate(LIGHTNING):
        reference = train(model, opt)
        for rank, rank_results in enumerate(results):
            result, what = rank_results[i], f"{model} {opt} {layout} rank {rank}"
            assert result["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL), f"{what}: losses"
            # tiling's default ("auto") hooks the networks it would take at long sequences
            asked = {"gradient_checkpointing": bool(layout.get("gradient_checkpointing")),
                     "tile_feed_forward": layout.get("tile_feed_forward", "auto") is not False}
            assert result["memory"] == asked, f"{what}: memory options on while training"
            assert not any(result["memory_after"].values()), f"{what}: memory options left on after fit"
            for name, before in reference["before"].items():
                assert_update_close(result["after"][name], reference["after"][name], before, UPDATE_RTOL, STEPS,
                                    f"{what}: {name}")


# Mutations of the derived plan that the checks above must catch: each is what a plan decided by
# sizes, or by a guessed order, would do.
def _split_by_size(self: Any, x: Any, dims: Any, streams: Any, name: str) -> Any:
    """Split an input along the last of its dimensions as long as its token dimension (a plan decided by sizes)."""
    from cp_plugin.probe import TokenDim
    from cp_plugin.streams import BlockStreams

    if isinstance(x, torch.Tensor) and len(dims) == 1:
        dims = (TokenDim(max(d for d in range(x.dim()) if x.shape[d] == x.shape[dims[0].dim]), dims[0].parts),)
    return BlockStreams._unmutated_split(self, x, dims, streams, name)


def _reversed_order(self: Any, terms: Any, what: str) -> list:
    """Put joint token sequences in the reverse of the order the block's concatenation shows."""
    from cp_plugin.probe import _Resolver

    return _Resolver._unmutated_ordered(self, terms, what)[::-1]


def _halo_without_rows(self: Any, *args: Any) -> Any:
    """Give a split grid's band no rows from neighbouring ranks: each rank convolves its own rows only."""
    self.radius = 0
    return self._unmutated_halo(*args)


def _no_token_sums(self: Any, sums: Any, *args: Any) -> None:
    """Leave linear attention's sums over tokens as each rank's own."""
    self._unmutated_init__((), *args)


def _no_layer_gather(self: Any, module: Any, roles: Any) -> Any:
    """Leave the tokens a layer cuts by a count (an attention layer's keys, an expert-choice MoE's tokens) as this
    rank's share."""
    import dataclasses

    return self._unmutated_block_ops(module, dataclasses.replace(roles, gathered=(), localized=()))


def _block_mask_attends_all(self: Any, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
    """Read flex attention's BlockMask as letting every query attend every key."""
    return torch.ones(1, q1 - q0, k1 - k0, dtype=torch.bool, device=device)


def _statistics_of_local_tokens(x: torch.Tensor, dim: int, config: Any) -> torch.Tensor:
    """Build a mask from statistics (NABLA's) over the tokens this rank holds, not over the whole sequence."""
    return x


def _statistics_out_of_order(x: torch.Tensor, dim: int, config: Any) -> torch.Tensor:
    """Gather the mask statistics' inputs over the sequence, but with the ranks' parts in reverse order."""
    from cp_plugin.attention import dispatch

    whole = dispatch._unmutated_whole_sequence(x, dim, config)
    return torch.cat(whole.chunk(config.cp_mesh.cp_size, dim)[::-1], dim)


def _first_heads(self: Any, first: int, stop: int) -> Any:
    """Give every Ulysses rank the per-head mask of the first ranks' heads."""
    from cp_plugin.attention.masks import BlockMaskTiles

    return self if len(self.lead) == 1 else BlockMaskTiles(self.block_mask, self.length, (0, stop - first))


def _whole_keys_on_every_rank(key: torch.Tensor, parts: Any, padding: Any, mesh: Any) -> torch.Tensor:
    """Count the keys every rank holds alike (a selection, a cache's prefix) on every rank, not once."""
    from types import SimpleNamespace

    from cp_plugin.attention import dispatch

    return dispatch._unmutated_selection_key_mask(key, parts, padding, SimpleNamespace(cp_rank=0))


# mutation -> (where, what, replacement, cases it must make fail)
MUTATIONS = {
    # a (1, 24, 1, 24) rotary table: 24 video tokens, head dim 24
    "split along the wrong dim": ("cp_plugin.streams.BlockStreams", "_split", _split_by_size,
                                  [("skyreels_v2:second", {"ring_degree": 2})]),
    # joint attention image first (a mask, a rotary table), and text first
    "joint order swapped": ("cp_plugin.probe._Resolver", "ordered", _reversed_order,
                            [("hunyuanvideo", {"ulysses_degree": 2}), ("chroma", {"ring_degree": 2})]),
    # Sana's 3 x 3 depthwise convolution and Sana-Video's temporal one over a split grid
    "halo dropped": ("cp_plugin.grid.HaloGrid", "_halo", _halo_without_rows,
                     [("sana", {"ring_degree": 2}), ("sana_video", {"ulysses_degree": 2})]),
    "sums over tokens kept local": ("cp_plugin.reductions.TokenReductions", "__init__", _no_token_sums,
                                    [("sana", {"ulysses_degree": 2})]),
    # Motif-Video's image-to-video cross-attention: encoder_hidden_states[:, 3:] of the split encoder stream;
    # NucleusMoE's experts, each taking its top tokens of the whole sequence
    "gather at a layer dropped": ("cp_plugin.streams.BlockStreams", "_block_ops", _no_layer_gather,
                                  [("motif_video:second", {"ring_degree": 2}), ("nucleusmoe", {"ulysses_degree": 2})]),
    # AnyFlow-FAR's frame-causal BlockMask, Qwen-Image 2.1's block-causal one
    "BlockMask ignored": ("cp_plugin.attention.masks.BlockMaskTiles", "real", _block_mask_attends_all,
                          [("anyflow_far:second", {"ring_degree": 2}), ("qwenimage21", {"ulysses_degree": 2})]),
    # Kandinsky 6 SR's NABLA mask, per head: from q/k block means over the whole sequence in order, each rank's heads
    "mask statistics of this rank's tokens": ("cp_plugin.attention.dispatch", "_whole_sequence",
                                              _statistics_of_local_tokens,
                                              [("kandinsky6_sr", {"ring_degree": 2}),
                                               ("kandinsky6_sr:second", {"ulysses_degree": 2})]),
    "mask statistics out of sequence order": ("cp_plugin.attention.dispatch", "_whole_sequence",
                                              _statistics_out_of_order,
                                              [("kandinsky6_sr:second", {"ring_degree": 2})]),
    "per-head mask of other heads": ("cp_plugin.attention.masks.BlockMaskTiles", "for_heads", _first_heads,
                                     [("kandinsky6_sr:second", {"ulysses_degree": 2})]),
    # Mochi's valid text selected per sample, SANA-WM's refiner's sink and history keys from its KV cache
    "keys held alike counted on every rank": ("cp_plugin.attention.dispatch", "_selection_key_mask",
                                              _whole_keys_on_every_rank,
                                              [("mochi", {"ring_degree": 2}), ("sana_wm_refiner:second",
                                                                               {"ulysses_degree": 2})]),
}


def mutated_runs(mutations: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Rank body: each mutation's cases trained with that mutation in place (an error is a result too), one mutation
    after another in one launch, each put back before the next."""
    import importlib

    import cp_plugin.streams

    found: dict[str, list[dict[str, Any]]] = {}
    for mutation in mutations:
        path, attribute, replacement, cases = MUTATIONS[mutation]
        module, name = path.rsplit(".", 1)
        owner = getattr(importlib.import_module(module), name)
        original = getattr(owner, attribute)
        setattr(owner, f"_unmutated_{attribute.lstrip('_')}", original)
        setattr(owner, attribute, replacement)
        cp_plugin.streams._ROLES.clear()  # probes remembered from before the mutation
        results = found[mutation] = []
        try:
            for case, layout in cases:
                try:
                    results.append(train(case, "sgd", layout))
                except Exception as err:  # noqa: BLE001 - a mutation that makes the run fail is caught
                    results.append({"error": f"{type(err).__name__}: {err}"})
        finally:
            setattr(owner, attribute, original)
            cp_plugin.streams._ROLES.clear()
    return found


@pytest.fixture(scope="module")
def mutated() -> dict[str, list[dict[str, Any]]]:
    """Rank 0's results of every mutation, from one two-process launch."""
    return run_distributed(mutated_runs, 2, list(MUTATIONS), timeout=600)[0]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_exactness_check_catches_a_wrong_plan(mutation: str, mutated: dict[str, list[dict[str, Any]]]) -> None:
    for (case, layout), result in zip(MUTATIONS[mutation][3], mutated[mutation], strict=True):
        if "error" in result:  # the plan's own checks refused it (a shape error or a contradiction)
            assert result["error"].startswith(("ValueError", "RuntimeError")), result["error"]
            continue
        with pytest.raises(AssertionError):
            check(result, train(case, "sgd"), "sgd", f"{case} {layout} with {mutation}")


def _nabla_with_its_blocks_as_mask_mod(monkeypatch: pytest.MonkeyPatch) -> None:
    """NABLA's BlockMask lists the blocks each query block attends and has no ``mask_mod``. Compiled flex attention
    (which the model needs at video sizes) computes the listed blocks only; eager flex attention, the only one that runs
    here, evaluates ``mask_mod`` alone and so attends every key. Give it the listed blocks as its ``mask_mod`` too."""
    from diffusers.models.transformers import transformer_kandinsky6_sr as k6

    build = k6.nabla_block_mask

    def nabla(*args: Any, **kwargs: Any) -> Any:
        mask = build(*args, **kwargs)
        listed, (rows, cols) = mask.to_dense().bool(), mask.BLOCK_SIZE
        mask.mask_mod = lambda b, h, q, kv: listed[b, h, q // rows, kv // cols]
        return mask

    monkeypatch.setattr(k6, "nabla_block_mask", nabla)


@pytest.mark.parametrize("case", ["anyflow_far", "qwenimage21:second", "kandinsky6_sr"])
def test_the_flex_reference_is_flex_attention(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-process reference of a model that attends through flex attention (no backward on CPU) runs the same
    attention through SDPA: its forward is flex attention's."""
    from fixtures.dits import CASES

    model, inputs = CASES[case].build(), CASES[case].inputs(torch.Generator().manual_seed(0))
    if case == "kandinsky6_sr":
        _nabla_with_its_blocks_as_mask_mod(monkeypatch)
    with torch.no_grad():
        flex = model(**inputs, return_dict=False)[0]
        with flex_as_sdpa():
            dense = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(dense, flex, rtol=1e-5, atol=1e-5)
    assert dense.abs().max() > 0
