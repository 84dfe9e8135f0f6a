"""``"auto"`` layouts: the choices for the usual machines, the estimates behind them, refusals, the
cross-node Ulysses warning, the log line on rank 0, and ``python train.py parallel=auto`` end to end."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from launcher import run_distributed
from omegaconf import OmegaConf
from test_train_cli import ROOT, assert_ok, last_global_step, train

from cp_plugin import ParallelConfig, ParallelMesh
from cp_plugin.core import ContextParallelCore
from cp_plugin.layout import (
    DEFAULT_SEQUENCE_LENGTH,
    Machine,
    ModelAttention,
    choose_layout,
    crosses_nodes,
    groups,
    model_attention,
    ring_bytes_sent,
    ulysses_bytes_sent,
    ulysses_placement_warning,
)
from fixtures.models import tiny_flux
from recipe.config import cp_devices, register_configs

AUTO = ParallelConfig(ring_degree="auto", ulysses_degree="auto")


def dit(heads: int, layers: int = 4, head_dim: int = 64, element_size: int = 2) -> list[ModelAttention]:
    return [ModelAttention(f"DiT{heads}", (heads,) * layers, (heads * head_dim,) * layers, element_size)]


def choose(config: ParallelConfig, heads: int | list[int], world: int, per_node: int, device: str = "cuda") -> Any:
    models = [m for h in ([heads] if isinstance(heads, int) else heads) for m in dit(h)]
    return choose_layout(config, models, world, per_node, device)


@pytest.mark.parametrize(
    ("config", "heads", "world", "per_node", "device", "expected"),  # expected (dp, ring, ulysses)
    [
        (AUTO, 24, 8, 8, "cuda", (1, 1, 8)),  # one 8-GPU node: Ulysses over the node
        (AUTO, 40, 32, 8, "cuda", (1, 4, 8)),  # 4 nodes: Ulysses inside each, ring across the 4
        (AUTO, 12, 16, 8, "cuda", (1, 4, 4)),  # 8 does not divide 12 heads: Ulysses 4, ring the rest
        (AUTO, 16, 16, 2, "cuda", (1, 8, 2)),  # 16 heads, but nodes of 2: Ulysses stays in a node
        (AUTO, 4, 2, 2, "cpu", (1, 1, 2)),  # two CPU processes, tiny Flux's 4 heads
        (AUTO, 3, 2, 2, "cpu", (1, 2, 1)),  # 3 heads forbid Ulysses 2: ring
        (AUTO, [24, 20], 8, 8, "cuda", (1, 2, 4)),  # every model's heads count: gcd(24, 20, 8) = 4
        (ParallelConfig(ring_degree="auto", ulysses_degree="auto", dp_degree=2), 24, 16, 8, "cuda", (2, 1, 8)),
        (ParallelConfig(ring_degree="auto", ulysses_degree="auto", dp_degree=4), 24, 32, 8, "cuda", (4, 1, 8)),
        (ParallelConfig(ring_degree=2, ulysses_degree="auto"), 24, 8, 8, "cuda", (1, 2, 4)),  # one degree fixed
        (ParallelConfig(ring_degree="auto", ulysses_degree=2), 24, 8, 8, "cuda", (1, 4, 2)),
    ],
)
def test_choices_for_the_usual_machines(config: ParallelConfig, heads: Any, world: int, per_node: int, device: str,
                                        expected: tuple[int, int, int]) -> None:
    choice = choose(config, heads, world, per_node, device)
    got = choice.config
    assert (got.dp_degree, got.ring_degree, got.ulysses_degree) == expected
    assert not got.auto and got.resolve(world) == got  # a complete layout: the mesh can be built from it
    assert [e.seconds for e in choice.estimates] == sorted(e.seconds for e in choice.estimates)
    assert (choice.estimates[0].ring, choice.estimates[0].ulysses) == expected[1:]
    for e in choice.estimates:  # every candidate keeps Ulysses inside a node and the head counts whole
        assert per_node % e.ulysses == 0 and all(h % e.ulysses == 0 for m in choice.models for h in m.heads)
        assert e.ring * e.ulysses * got.dp_degree == world


def test_every_layout_the_rules_allow_is_estimated() -> None:
    choice = choose(AUTO, 40, 32, 8)
    assert sorted((e.ring, e.ulysses) for e in choice.estimates) == [(4, 8), (8, 4), (16, 2), (32, 1)]
    assert len(choose(AUTO, 3, 2, 2, "cpu").estimates) == 1  # ring 2 is the only one


def test_estimates_are_the_benchmark_byte_formulas_over_the_slowest_link() -> None:
    tokens, width = 1024, 256
    x32 = tokens / 8 * width * 4  # one local q/k/v shard in float32 over cp 8
    assert ulysses_bytes_sent(tokens, width, 2, 4, 4) == pytest.approx(8 * x32 * 3 / 4)
    assert ring_bytes_sent(tokens, width, 2, 4, 4) == pytest.approx(6 * x32 * 1)
    x16 = x32 / 2  # bf16 q/k/v; the ring's dK/dV accumulators still travel in float32
    assert ulysses_bytes_sent(tokens, width, 2, 4, 2) == pytest.approx(8 * x16 * 3 / 4)
    assert ring_bytes_sent(tokens, width, 2, 4, 2) == pytest.approx((4 + 4) * x16 * 1)
    assert ring_bytes_sent(tokens, width, 1, 8, 4) == 0 and ulysses_bytes_sent(tokens, width, 8, 1, 4) == 0

    models = dit(40, layers=3)
    config = ParallelConfig(ring_degree="auto", ulysses_degree="auto", sequence_length=tokens,
                            intra_node_bandwidth=400, inter_node_bandwidth=20)
    choice = choose_layout(config, models, 32, 8, "cuda")
    by_layout = {(e.ring, e.ulysses): e for e in choice.estimates}
    best = by_layout[(4, 8)]  # ring groups span the 4 nodes: inter-node; Ulysses inside a node: intra-node
    assert best.ulysses_bytes == pytest.approx(3 * ulysses_bytes_sent(tokens, 40 * 64, 4, 8, 2))
    assert best.ring_bytes == pytest.approx(3 * ring_bytes_sent(tokens, 40 * 64, 4, 8, 2))
    assert best.seconds == pytest.approx(best.ulysses_bytes / 400e9 + best.ring_bytes / 20e9)


def test_sequence_length_scales_the_estimates_but_never_changes_the_choice() -> None:
    short = choose_layout(ParallelConfig(ring_degree="auto", ulysses_degree="auto", sequence_length=1024),
                          dit(40), 32, 8, "cuda")
    default = choose_layout(AUTO, dit(40), 32, 8, "cuda")
    assert default.sequence_length == DEFAULT_SEQUENCE_LENGTH
    assert short.config == ParallelConfig(ring_degree=4, ulysses_degree=8, dp_degree=1, sequence_length=1024)
    assert (default.config.ring_degree, default.config.ulysses_degree) == (4, 8)
    for a, b in zip(short.estimates, default.estimates):
        assert (a.ring, a.ulysses) == (b.ring, b.ulysses)
        assert b.seconds == pytest.approx(a.seconds * DEFAULT_SEQUENCE_LENGTH / 1024)


def test_bandwidths_default_per_device_and_settings_override_them() -> None:
    gpu, cpu = Machine.of(AUTO, 16, 8, "cuda"), Machine.of(AUTO, 2, 2, "cpu")
    assert (gpu.intra_node_bandwidth, gpu.inter_node_bandwidth, gpu.nodes) == (450.0, 50.0, 2)
    assert (cpu.intra_node_bandwidth, cpu.inter_node_bandwidth, cpu.nodes) == (1.0, 1.0, 1)
    mine = Machine.of(ParallelConfig(ring_degree="auto", intra_node_bandwidth=100, inter_node_bandwidth=12.5),
                      16, 8, "cuda")
    assert (mine.intra_node_bandwidth, mine.inter_node_bandwidth, mine.defaults_of) == (100, 12.5, "")
    # A ring that stays in a node costs less than one that crosses nodes, at the same bytes.
    in_node = choose(ParallelConfig(ring_degree="auto", ulysses_degree=4, dp_degree=2), 24, 16, 8)
    across = choose(ParallelConfig(ring_degree="auto", ulysses_degree=4), 24, 16, 8)
    assert in_node.estimates[0].ring == 2 and across.estimates[0].ring == 4
    assert in_node.estimates[0].seconds < across.estimates[0].seconds


def test_the_log_line_names_the_choice_the_alternatives_and_the_inputs() -> None:
    line = choose(AUTO, 40, 32, 8).describe()
    assert line.startswith("automatic layout: ring_degree=4 x ulysses_degree=8 x dp_degree=1 on 32 processes "
                           "(8 per node, 4 nodes), estimated communication ")
    alternatives = line.split("alternatives: ")[1]
    assert [part.split(" ms")[0].rsplit(" ", 1)[0] for part in alternatives.split("; ")[:3]] == [
        "ring_degree=8 x ulysses_degree=4", "ring_degree=16 x ulysses_degree=2", "ring_degree=32 x ulysses_degree=1"]
    assert "DiT40 40 heads x 4 layers, 4096 tokens, 450 GB/s in a node and 50 GB/s across nodes (cuda defaults)" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("config", "world", "per_node", "heads", "message"),
    [
        (ParallelConfig(ring_degree="auto", ulysses_degree="auto", dp_degree=3), 8, 8, 24,
         r"dp_degree=3 does not divide world_size=8; use dp_degree 1, 2, 4 or 8"),
        (ParallelConfig(ring_degree=3, ulysses_degree="auto"), 8, 8, 24,
         r"ring_degree=3 does not divide the cp size 8 .*; use ring_degree 1, 2, 4 or 8 or ring_degree=auto"),
        (ParallelConfig(ring_degree=1, ulysses_degree="auto"), 2, 2, 3,
         r"ring_degree=1 leaves ulysses_degree=2 of the cp size 2, which must divide the processes per node \(2\) "
         r"and every head count \(3\); use ring_degree 2 or ring_degree=auto"),
        (ParallelConfig(ring_degree="auto", ulysses_degree=4), 8, 8, 6,
         r"ulysses_degree=4 does not divide num_attention_heads=6 of DiT6; use ulysses_degree 1 or 2"),
        (AUTO, 8, 3, 24, r"processes_per_node=3 .* does not divide world_size=8"),
    ],
)
def test_impossible_settings_are_refused_naming_the_setting_and_a_fix(config: ParallelConfig, world: int,
                                                                       per_node: int, heads: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose(config, heads, world, per_node)


def test_auto_without_models_or_unresolved_is_refused_before_any_collective() -> None:
    with pytest.raises(ValueError, match="'auto' is chosen from the attention head counts .* none were found"):
        choose_layout(AUTO, [], 2, 2, "cpu")
    with pytest.raises(ValueError, match="'auto' is chosen from the models before the mesh is built"):
        ParallelMesh.build(AUTO, "cpu")  # refused before it asks the (absent) process group anything
    with pytest.raises(ValueError, match="the cp size is known once 'auto' is resolved"):
        AUTO.cp_degree
    with pytest.raises(ValueError, match=r"ring_degree='two' must be an integer >= 1 or 'auto'"):
        ParallelConfig(ring_degree="two")
    assert AUTO.resolve(4) == ParallelConfig(ring_degree="auto", ulysses_degree="auto", dp_degree=1)


def test_model_attention_finds_every_cp_model_and_its_head_counts() -> None:
    class Wrapper(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = tiny_flux()  # 1 joint + 1 single block, 4 heads of 16

    (found,) = model_attention(Wrapper())
    assert found.name == "FluxTransformer2DModel ('transformer')"
    assert found.heads == (4, 4) and found.widths == (64, 64) and found.element_size == 4
    assert choose_layout(AUTO, [found], 8, 8, "cuda").config.ulysses_degree == 4  # 4 heads cap Ulysses at 4


def test_ulysses_groups_cross_nodes_exactly_when_they_do_not_divide_the_node() -> None:
    # The mesh order ("dp", "ring", "ulysses"): ulysses groups are neighbours, ring groups stride by ulysses.
    assert list(groups("ulysses", 2, 2, 2)) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert list(groups("ring", 2, 2, 2)) == [range(0, 4, 2), range(1, 4, 2), range(4, 8, 2), range(5, 8, 2)]
    for world in range(1, 25):
        for per_node in (d for d in range(1, world + 1) if world % d == 0):
            for ulysses in (d for d in range(1, world + 1) if world % d == 0):
                expected = world > per_node and per_node % ulysses != 0
                assert crosses_nodes("ulysses", world // ulysses, 1, ulysses, per_node) == expected
    assert crosses_nodes("ring", 1, 4, 8, 8) and not crosses_nodes("ring", 4, 2, 4, 8)


def test_a_fixed_layout_with_ulysses_across_nodes_is_warned_about() -> None:
    message = ulysses_placement_warning(ParallelConfig(ulysses_degree=4, ring_degree=2), 8, 2)
    assert message is not None and message.startswith(
        "ulysses_degree=4 with 2 processes per node puts Ulysses groups across nodes (4 nodes)")
    assert "use ulysses_degree 1 or 2 (dividing the node) with ring_degree for the rest" in message
    assert ulysses_placement_warning(ParallelConfig(ulysses_degree=3), 6, 4) is None  # 4 does not divide 6
    assert ulysses_placement_warning(ParallelConfig(ulysses_degree=6, ring_degree=2), 12, 4) is not None
    assert ulysses_placement_warning(ParallelConfig(ulysses_degree=4, ring_degree=2), 8, 4) is None
    assert ulysses_placement_warning(ParallelConfig(ulysses_degree=8), 8, 8) is None  # one node


def _core_on_two_ranks() -> dict[str, Any]:
    """Each rank: an auto core (logs the choice) and a fixed one with Ulysses across two 1-process nodes."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("cp_plugin").addHandler(handler)
    logging.getLogger("cp_plugin").setLevel(logging.INFO)
    auto = ContextParallelCore(AUTO)
    auto.validate(2, modules=[torch.nn.ModuleDict({"transformer": tiny_flux()})], processes_per_node=2,
                  device_type="cpu")
    mesh = auto.start(torch.device("cpu"))
    fixed = ContextParallelCore(ParallelConfig(ulysses_degree=2))
    fixed.validate(2, processes_per_node=1, device_type="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed.start(torch.device("cpu"))
    return {"rank": dist.get_rank(), "layout": (mesh.dp_size, mesh.ring_size, mesh.ulysses_size),
            "logged": records, "warned": [str(w.message) for w in caught if "across nodes" in str(w.message)]}


@pytest.mark.timeout(120)
def test_the_core_resolves_auto_identically_and_reports_on_rank_zero_only() -> None:
    ranks = run_distributed(_core_on_two_ranks, 2, timeout=100)
    assert [r["layout"] for r in ranks] == [(1, 1, 2), (1, 1, 2)]
    assert len(ranks[0]["logged"]) == 1 and ranks[0]["logged"][0].startswith(
        "automatic layout: ring_degree=1 x ulysses_degree=2 x dp_degree=1 on 2 processes (2 per node, 1 node)")
    assert len(ranks[0]["warned"]) == 1 and "ulysses_degree=2 with 1 processes per node" in ranks[0]["warned"][0]
    assert ranks[1]["logged"] == [] and ranks[1]["warned"] == []


def test_cp_devices_gives_auto_two_processes_unless_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cp_devices("auto", "auto", None) == 2
    assert cp_devices(2, "auto", None) == 4 and cp_devices("auto", "auto", 2) == 4
    assert cp_devices(2, 2, None) == 4  # fixed degrees: what the layout needs, as before
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(config_name="config", overrides=["parallel=auto"])
    assert cfg.trainer.devices == 2
    assert OmegaConf.to_object(cfg.parallel) == AUTO
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cp_devices("auto", "auto", None) == 8


@pytest.mark.timeout(90)
def test_train_py_parallel_auto_logs_its_choice_and_trains(tmp_path: Path) -> None:
    run = tmp_path / "auto"
    result = train(run, "parallel=auto", "logger=csv", "trainer.max_steps=2", timeout=85)
    assert_ok(result)
    (line,) = [ln for ln in (run / "train.log").read_text().splitlines() if "automatic layout:" in ln]
    assert ("automatic layout: ring_degree=1 x ulysses_degree=2 x dp_degree=1 on 2 processes (2 per node, 1 node)"
            in line), line
    assert "alternatives: ring_degree=2 x ulysses_degree=1 " in line  # tiny Flux: 4 heads allow Ulysses 2
    assert "FluxTransformer2DModel ('transformer') 4 heads x 4 layers" in line
    assert last_global_step(run) == 2
