"""ParallelConfig: validation messages, resolution against a world size, diffusers and Hydra interop."""

from __future__ import annotations

import diffusers
import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

from cp_plugin import ParallelConfig
from cp_plugin.config import register_configs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ring_degree": 0}, "ring_degree=0 must be an integer >= 1"),
        ({"ulysses_degree": 1.5}, "ulysses_degree=1.5 must be an integer >= 1"),
        ({"dp_degree": -2}, "dp_degree=-2 must be an integer >= 1"),
        ({"ring_degree": True}, "ring_degree=True must be an integer >= 1"),
        ({"ring_heads_per_pass": 0}, "ring_heads_per_pass=0 must be an integer >= 1"),
        ({"rotate_method": "alltoall"}, "rotate_method='alltoall' is not supported; use one of 'p2p', 'allgather'"),
        ({"gradient_checkpointing": True, "checkpoint_policy": "selective"},
         "checkpoint_policy='selective' is not supported; use one of 'full', 'save_attention'"),
        ({"checkpoint_policy": "save_attention"}, "it needs gradient_checkpointing=True .*parallel.gradient_checkpointing"),
        ({"tile_feed_forward": "long"}, r"tile_feed_forward='long' must be True or False, or 'auto' .*parallel\.tile"),
        ({"tile_tokens": 0}, r"tile_tokens=0 must be an integer >= 1"),
    ],
)
def test_invalid_fields_name_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_resolve_derives_dp_and_rejects_layouts_that_do_not_fill_the_world() -> None:
    assert ParallelConfig(ring_degree=2, ulysses_degree=2).resolve(8).dp_degree == 2
    assert ParallelConfig(ulysses_degree=2, dp_degree=2).resolve(4).dp_degree == 2
    with pytest.raises(ValueError, match=r"ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2; .* 1 or 2"):
        ParallelConfig(ring_degree=3).resolve(2)
    with pytest.raises(ValueError, match=r"dp_degree=4 x ring_degree=2 .* != world_size=4; use dp_degree=2"):
        ParallelConfig(ring_degree=2, dp_degree=4).resolve(4)


def test_to_diffusers_and_back() -> None:
    ours = ParallelConfig(ring_degree=2, ulysses_degree=4, convert_to_fp32=False)
    theirs = ours.to_diffusers()
    assert isinstance(theirs, diffusers.ParallelConfig)
    cp = theirs.context_parallel_config
    assert (cp.ring_degree, cp.ulysses_degree, cp.convert_to_fp32) == (2, 4, False)
    back = ParallelConfig.from_any(theirs)
    assert (back.ring_degree, back.ulysses_degree, back.convert_to_fp32) == (2, 4, False)
    assert ParallelConfig.from_any(cp).ulysses_degree == 4
    assert ParallelConfig.from_any({"ring_degree": 2}).ring_degree == 2
    with pytest.raises(ValueError, match="ring_degree=1 and ulysses_degree=1 describe plain data parallelism"):
        ParallelConfig().to_diffusers()
    with pytest.raises(ValueError, match="ulysses_anything/ring_anything are not supported"):
        ParallelConfig.from_any(diffusers.ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with pytest.raises(TypeError, match="parallel_config of type int is not understood"):
        ParallelConfig.from_any(3)


def test_hydra_structured_schema_type_checks_overrides() -> None:
    register_configs()
    schema = OmegaConf.structured(ParallelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["ring_degree=2", "dp_degree=4"]))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, ParallelConfig) and (config.ring_degree, config.dp_degree) == (2, 4)
    # a degree may be "auto", so the schema types it int | str: a wrong string is refused when the config is built
    with pytest.raises(ValueError, match=r"ring_degree='two' must be an integer >= 1 or 'auto'"):
        OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["ring_degree=two"])))
    auto = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["ring_degree=auto"])))
    assert auto.ring_degree == "auto"
    with pytest.raises(ValueError, match="rotate_method='ring' is not supported"):
        OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["rotate_method=ring"])))
    # tiling is True, False or "auto" (the default)
    assert OmegaConf.to_object(schema).tile_feed_forward == "auto"
    for value, expected in (("false", False), ("true", True), ("auto", "auto")):
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([f"tile_feed_forward={value}"]))
        assert OmegaConf.to_object(merged).tile_feed_forward == expected


def test_parallel_group_composes_from_the_config_store() -> None:
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(overrides=["+parallel=schema", "parallel.ulysses_degree=2"])
    assert OmegaConf.to_object(cfg.parallel) == ParallelConfig(ulysses_degree=2)
