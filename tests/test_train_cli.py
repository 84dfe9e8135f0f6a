"""``train.py`` end to end, launched the ways users launch it, plus the recipe pieces it relies on."""

from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipe.data import DataConfig, PhotoCrops, to_latent, to_pixels
from recipe.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "data.crops=16", "sample_steps=2", "sample_every_n_steps=0", "timeout_s=60",
        "trainer.log_every_n_steps=1"]
LOGGED_EVERY_STEP = ["train/loss", "perf/tokens_per_s", "perf/step_time_s", "comm/bytes_sent_per_step",
                     "memory/peak_mb_rank0", "memory/peak_mb_rank1", "lr-AdamW"]


def train(run_dir: Path, *overrides: str, torchrun: bool = False, multirun: bool = False,
          timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun \
        else [sys.executable]
    mode, where = (["--multirun"], f"hydra.sweep.dir={run_dir}") if multirun else ([], f"hydra.run.dir={run_dir}")
    cmd = [*launcher, str(ROOT / "train.py"), *mode, *TINY, *overrides, where]
    return subprocess.run(cmd, check=False, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def wandb_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Config and history rows of the one offline W&B run under ``run_dir``.

    The ``.wandb`` file is a LevelDB-style log (7-byte file header, then 32 KiB blocks of chunks,
    each with a 7-byte header: crc32, length, type) of ``wandb_internal_pb2.Record`` messages;
    wandb ships no reader for it any more, so the test reads it here.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # exactly one run: only rank 0 creates it
    raw, block, full, first, last = path.read_bytes(), 32768, 1, 2, 4
    assert raw[:4] == b":W&B", raw[:7]
    config, history, chunk, pos = {}, [], b"", 7
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk = (b"" if kind in (full, first) else chunk) + raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (full, last):
            continue
        record = Record.FromString(chunk)
        if record.HasField("config"):
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        if record.HasField("history"):
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return config, history


def last_global_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.timeout(240)
def test_multirun_trains_each_layout_in_two_processes_with_a_wandb_offline_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    assert_ok(train(sweep, "parallel=ulysses,ring", "trainer.max_steps=2", multirun=True))
    for job, (layout, degree) in enumerate([("ulysses", "ulysses_degree"), ("ring", "ring_degree")]):
        run = sweep / str(job)
        config, history = wandb_run(run)
        assert config["parallel"][degree] == 2 and config["trainer"]["devices"] == 2, config  # resolved Hydra config
        steps: dict[int, dict] = {}  # Lightning logs the learning rate and the metrics of a step as separate rows
        for row in history:
            steps.setdefault(row["trainer/global_step"], {}).update(row)
        assert sorted(steps) == [0, 1, 2], (layout, history)  # step 2: the final sample grid
        for row in (steps[0], steps[1]):
            assert all(key in row for key in LOGGED_EVERY_STEP), (layout, row)
            assert math.isfinite(row["train/loss"]) and row["train/loss"] > 0, row
            assert row["perf/tokens_per_s"] > 0 and row["memory/peak_mb_rank1"] > 0, row
            assert row["comm/bytes_sent_per_step"] > 0, (layout, row)  # the model really ran context parallel
        assert steps[2]["samples/_type"] == "images/separated" and steps[2]["samples/count"] == 1, steps[2]
        assert (run / "samples.png").is_file() and (run / "loss_curve.png").is_file()
        throughput = json.loads((run / "throughput.json").read_text())  # what benchmarks.default_run reports
        assert throughput["steps"] == 2 and throughput["tokens_per_s_after_first_step"] > 0, throughput
        assert len(json.loads((run / "loss_curve.json").read_text())["loss"]) == 2
        assert last_global_step(run) == 2


@pytest.mark.timeout(240)
def test_torchrun_launch_and_resume_continue_at_the_right_step(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["parallel=ulysses", "model=tiny_wan", "data=clips", "logger=csv", "checkpoint_every_n_steps=1"]
    assert_ok(train(first, *common, "trainer.max_steps=2", torchrun=True))
    assert_ok(train(second, *common, "trainer.max_steps=4", f"resume={first}", torchrun=True))
    assert last_global_step(first) == 2 and last_global_step(second) == 4
    with (second / "csv" / "version_0" / "metrics.csv").open() as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [2, 3], steps  # the resumed run trained steps 2 and 3 only


@pytest.mark.timeout(120)
def test_bad_override_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    result = train(tmp_path / "bad", "parallel.ring_degree=3", "trainer.devices=2", timeout=60)
    assert result.returncode != 0
    assert "ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2" in result.stderr
    assert not (tmp_path / "bad" / "wandb").exists()  # failed before any process, logger or run started
    typo = train(tmp_path / "typo", "parallel.ring_degree=two", timeout=60)
    assert typo.returncode != 0 and "parallel.ring_degree" in typo.stderr


@pytest.mark.timeout(60)
def test_a_folder_of_images_becomes_invertible_latents_with_a_class_per_image_quadrant(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = PhotoCrops(DataConfig(path=str(tmp_path), image_size=16, crops=12, photo_size=None))
    assert data.num_classes == 3 * 4 and len(data) == 12
    assert data[0]["latents"].shape == (1, 12, 8, 8)
    labels = [item["label"] for item in data]
    assert {label // 4 for label in labels} == {0, 1, 2} and all(0 <= label < 12 for label in labels)
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "0.png"))).permute(2, 0, 1)[None]
    assert torch.equal((to_pixels(to_latent(pixels)) * 255).round().to(torch.uint8), pixels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.path='.*empty' contains no"):
        PhotoCrops(DataConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="data.path='.*missing' is not a directory"):
        PhotoCrops(DataConfig(path=str(tmp_path / "missing")))


@pytest.mark.timeout(60)
def test_pretrained_path_loads_local_weights_and_bad_rope_axes_name_the_setting(tmp_path: Path) -> None:
    tiny = ModelConfig(family="flux", config={"in_channels": 12}, seed=3)
    build_model(tiny).save_pretrained(tmp_path / "flux")
    loaded = build_model(ModelConfig(family="flux", pretrained_path=str(tmp_path / "flux")))
    for (name, expected), actual in zip(build_model(tiny).state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(expected, actual), name
    with pytest.raises(ValueError, match=r"axes_dims_rope=\[4,6,6\] sums to 16 .*attention_head_dim=32"):
        build_model(ModelConfig(family="flux", config={"attention_head_dim": 32}))

