"""What fine-tuning a pretrained pipeline costs: the latent cache's throughput and size, LoRA vs full memory.

    python -m benchmarks.finetune        # writes benchmarks/results/finetune.md (and finetune.json)

Two questions the fine-tuning recipe raises before anyone runs it on a real model:

1. **How fast does ``prepare.py`` fill a cache, and how big is it?** Every family's tiny offline
   pipeline of ``fixtures/pipelines.py`` encodes a captioned folder (``fixtures/media.py``, padded
   with copies of its good files so the rate is over tens of files) through
   :func:`recipe.latents.encode_folder`, on one process with one torch thread, twice into fresh
   caches (the spread between the two; the first also pays any one-time costs). The pipeline's
   load is timed inside the same call (``load_pipeline`` is wrapped with a timer) and left out of
   the rate; the time inside the VAE and inside the text encoders is timed the same way. The encoders are tiny, so this measures the code path and the
   per-call overhead of small models run one file at a time, not a real VAE's or T5's compute.
   Bytes per sample are the shards' sizes on disk over the samples, with each cached tensor's share.
2. **How much memory do the trained weights cost with LoRA and without?** The tiny pretrained Flux
   transformer is trained one real AdamW step (the recipe's ``FlowMatching`` on a batch from the
   cache) at LoRA rank 0 (full), 4 and 16, with a float32 and a bfloat16 base, and its parameters,
   gradients and optimizer state are counted from the tensors themselves. The same counts are then
   computed for Flux.1-dev's real configuration, and for every family's published transformer, built on
   the meta device (no weights, no download) with the same LoRA added by :func:`recipe.lora.add_lora`; there the optimizer state is
   computed from the counts with the rule the tiny measurement checks (AdamW keeps ``exp_avg`` and
   ``exp_avg_sq`` in each trainable parameter's dtype, plus a float32 ``step`` per tensor).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import recipe.latents  # noqa: E402
from benchmarks.provenance import describe, record  # noqa: E402
from fixtures.dits import CASES  # noqa: E402
from fixtures.media import FRAMES, write_media  # noqa: E402
from fixtures.pipelines import build_tiny_pipeline  # noqa: E402
from recipe.cache import BucketBatches, LatentCache, shard_files  # noqa: E402
from recipe.families import FAMILIES, MAX_SEQUENCE_LENGTH  # noqa: E402
from recipe.families import family as family_of  # noqa: E402
from recipe.flow_matching import FlowMatching, OptimizerConfig  # noqa: E402
from recipe.latents import LatentsConfig, encode_folder  # noqa: E402
from recipe.lora import LoraSettings, add_lora  # noqa: E402
from recipe.models import ModelConfig  # noqa: E402

COMMAND = "python -m benchmarks.finetune"
# The tiny pipelines' buckets (as tests/test_finetune.py), for image and video families: the image pipelines' VAE
# factor 2 with 2x2 patches, the video pipelines' 16 and 4k+1 frames: 5, a length every video family takes (LTX-Video
# image-to-video generates the frames after the first, so it takes no 1-frame bucket).
BUCKETS: dict[bool, dict[str, list]] = {
    False: {"resolutions": [[64, 64], [48, 80], [80, 48]], "frames": [1]},
    True: {"resolutions": [[32, 32], [32, 48]], "frames": [5]},
}
GOOD_FILES = {False: 160, True: 64}  # captioned, decodable files per folder (the fixture writes 6 and 4)
# The published transformers whose configuration differs from its class's real configuration in fixtures/dits:
# Wan2.1-I2V-14B (transformer/config.json) takes the condition's channels and a CLIP image embedding; FLUX.2 [klein]
# 4B is Flux.2's transformer (whose defaults are FLUX.2 [dev]'s) at 24 heads, 5 + 20 blocks, Qwen3-4B's three stacked
# layers (3 x 2560) and no guidance embedding.
PUBLISHED: dict[str, dict[str, Any]] = {
    "wan_i2v": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "flux2_klein": {"num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20, "joint_attention_dim": 7680,
                    "guidance_embeds": False},
}
CACHE_RUNS = 2
THREADS = 1  # torch intra-op threads for the whole run
RANKS = (0, 4, 16)
FAMILY_RANK = 16  # the LoRA rank of the every-family table
ALPHA = {4: 8.0, 16: 16.0}  # lora_alpha does not change any count; set as a run would
DTYPES = ("float32", "bfloat16")
# Flux.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def count(n: int) -> str:
    return f"{n:,}"


# --- 1. latent cache --------------------------------------------------------------------------------------------------

def media_folder(folder: Path, family: str) -> dict[str, int]:
    """The fixture's folder for ``family`` plus copies of its good files (with their captions and reference images)
    up to GOOD_FILES."""
    chosen = family_of(family)
    files = write_media(folder, "videos" if chosen.video else "images", references=chosen.reference)
    good = files["good"]
    for k in range(GOOD_FILES[chosen.video] - len(good)):
        source = folder / good[k % len(good)]  # round robin: every bucket of the fixture gets its share
        shutil.copyfile(source, folder / f"copy_{k}{source.suffix}")
        shutil.copyfile(source.with_suffix(".txt"), folder / f"copy_{k}.txt")
        if chosen.reference:
            shutil.copyfile(folder / f"{source.stem}.ref.png", folder / f"copy_{k}.ref.png")
    bad = len(files["corrupt"]) + len(files["uncaptioned"]) + len(files.get("unreferenced", []))
    return {"good": GOOD_FILES[chosen.video], "bad": bad}


@dataclass
class CacheRun:
    wall_s: float  # the whole encode_folder call
    cpu_s: float  # this process's CPU time in it: well under wall_s when other work takes the cores
    load_s: float  # load_pipeline inside it
    load_cpu_s: float  # this process's CPU time in load_pipeline
    vae_s: float  # the family's encode_pixels (the pipeline's VAE and the latents' normalisation)
    text_s: float  # the family's encode_prompts (tokenisers and text encoders)
    cached: int
    skipped: int
    shard_bytes: int
    samples: int
    tensor_bytes: dict[str, int]  # per cached tensor name, summed over samples (data only, no header)

    @property
    def rate(self) -> float:
        """Cached files per second, pipeline load excluded."""
        return self.cached / (self.wall_s - self.load_s)

    @property
    def cpu_rate(self) -> float:
        """Cached files per CPU second of this process, pipeline load excluded: what the rate would be on a
        core of its own (nearly: other work still shares caches and memory bandwidth)."""
        return self.cached / (self.cpu_s - self.load_cpu_s)


@contextmanager
def timers(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, float]]:
    """Seconds spent in each ``getattr(owner, attribute)`` while inside, by name (and this process's CPU
    seconds in it, as ``<name>_cpu``); the attributes are wrapped with a timer (an instance attribute
    shadows a method) and put back on the way out."""
    spent = dict.fromkeys([*targets, *(f"{name}_cpu" for name in targets)], 0.0)
    saved = {name: (owner, attribute, vars(owner).get(attribute)) for name, (owner, attribute) in targets.items()}

    def timed(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
                spent[f"{name}_cpu"] += time.process_time() - cpu

        return call

    for name, (owner, attribute) in targets.items():
        setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    try:
        yield spent
    finally:
        for owner, attribute, before in saved.values():
            if before is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, before)


def cache_contents(cache: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes of the shards on disk, samples, data bytes per tensor name) of a cache."""
    total, tensors = 0, defaultdict(int)
    for shard in shard_files(cache):
        total += shard.stat().st_size
        with safe_open(shard, framework="pt") as opened:
            for key in opened.keys():
                tensors[key.split(".", 1)[1]] += opened.get_tensor(key).nbytes
    return total, len(LatentCache(cache)), dict(tensors)


def encode(family: str, pipeline: Path, media: Path, cache: Path) -> CacheRun:
    model = ModelConfig(family=family, pretrained_path=str(pipeline), dtype="float32")
    chosen = family_of(family)
    data = LatentsConfig(cache=str(cache), path=str(media), **BUCKETS[chosen.video])  # the object encode_folder uses: its methods are timed on it
    parts = {"load": (recipe.latents, "load_pipeline"), "vae": (chosen, "encode_pixels"),
             "text": (chosen, "encode_prompts")}
    with timers(parts) as spent:
        start, cpu = time.perf_counter(), time.process_time()
        result = encode_folder(model, data)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    shard_bytes, samples, tensors = cache_contents(cache)
    return CacheRun(wall, cpu, spent["load"], spent["load_cpu"], spent["vae"], spent["text"], result["cached"], len(result["skipped"]),
                    shard_bytes, samples, tensors)


# --- 2. LoRA vs full fine-tuning memory -------------------------------------------------------------------------------

def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predicted_state_bytes(trainable: list[torch.Tensor]) -> int:
    """AdamW's state as torch keeps it: exp_avg and exp_avg_sq like the parameter, and a float32 scalar step."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in trainable)


def dtypes(tensors: list[torch.Tensor]) -> str:
    return "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))


def tiny_step(pipeline: Path, cache: Path, dtype: str, rank: int) -> dict[str, Any]:
    """One real AdamW step of the tiny pretrained Flux transformer; what its parameters, gradients and state hold."""
    torch.manual_seed(0)  # the adapters' initial weights
    lora = LoraSettings(rank=rank, alpha=ALPHA.get(rank))
    module = FlowMatching(ModelConfig(family="flux", pretrained_path=str(pipeline), dtype=dtype), OptimizerConfig(), 0,
                          lora)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = BucketBatches(LatentCache(cache), 1)[0]
    loss = module(batch)
    loss.backward()
    optimizer.step()
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    state = [t for entry in optimizer.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
    if any(p.grad is not None for p in frozen):
        raise RuntimeError(f"rank {rank}, {dtype}: a frozen weight holds a gradient; the counts below would miss it")
    return {
        "dtype": dtype, "rank": rank, "loss": loss.item(),
        "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
        "param_bytes": nbytes(params), "trainable_bytes": nbytes(trainable),
        "trainable_dtype": dtypes(trainable), "frozen_dtype": dtypes(frozen) or "-",
        "grad_bytes": nbytes(p.grad for p in trainable if p.grad is not None),
        "state_bytes": nbytes(state), "state_dtype": dtypes(state),
        "state_predicted": predicted_state_bytes(trainable),
    }


def lora_from_shapes(model: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """Adapter parameters LoRA adds to ``model`` (not yet adapted), from the targeted Linear layers' shapes."""
    return sum(rank * (layer.in_features + layer.out_features) for name, layer in model.named_modules()
               if isinstance(layer, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def published_config(family: str) -> dict[str, Any]:
    """The published transformer's constructor arguments for ``family``: its class's real configuration in
    ``fixtures/dits`` (what tests/test_real_configs.py resolves plans for), with PUBLISHED's differences."""
    name = family_of(family).transformer_class.__name__
    case = next((c for c in CASES.values() if c.cls == name and c.real_inputs is not None), None)
    return {**(case.real_config or {} if case else {}), **PUBLISHED.get(family, {})}


def meta_counts(cls: type, config: dict[str, Any], dtype: str, rank: int) -> dict[str, Any]:
    """A transformer's parameter and training-state bytes, built on the meta device (nothing allocated)."""
    logger = diffusers.utils.logging.get_logger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel("ERROR")  # `.to(dtype)` advises from_pretrained(torch_dtype=...): there are no weights to load here
    try:
        with torch.device("meta"):
            model = cls(**config).to(getattr(torch, dtype))
    finally:
        logger.setLevel(level)
    settings = LoraSettings(rank=rank, alpha=ALPHA.get(rank))
    expected = lora_from_shapes(model, rank, settings.target_modules)
    with torch.device("meta"):  # peft builds the adapters on the default device, then moves them to the base's
        add_lora(model, settings)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {
        "dtype": dtype, "rank": rank, "devices": sorted({str(p.device) for p in params}),
        "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
        "lora_added": added, "lora_from_shapes": expected,
        "param_bytes": nbytes(params), "trainable_bytes": nbytes(trainable), "trainable_dtype": dtypes(trainable),
        "grad_bytes": nbytes(trainable), "state_bytes": predicted_state_bytes(trainable),
    }


# --- report -----------------------------------------------------------------------------------------------------------

def cache_table(runs: dict[str, list[CacheRun]], folders: dict[str, dict[str, int]]) -> list[str]:
    rows = []
    for family, family_runs in runs.items():
        for i, run in enumerate(family_runs, 1):
            encoding = run.wall_s - run.load_s
            rest = encoding - run.vae_s - run.text_s
            rows.append(
                f"| {family} | {i} | {folders[family]['good']} + {folders[family]['bad']}"
                f" | {run.cached} / {run.skipped} | {run.load_s:.2f} | {encoding:.2f} | {run.vae_s:.2f} "
                f"({100 * run.vae_s / encoding:.0f} %) | {run.text_s:.2f} ({100 * run.text_s / encoding:.0f} %) "
                f"| {rest:.2f} ({100 * rest / encoding:.0f} %) | {run.cpu_s / run.wall_s:.2f} | {run.rate:.1f} "
                f"| {run.cpu_rate:.1f} "
                f"| {human(run.shard_bytes / run.samples)} |"
            )
    return ["| family | run | files: good + bad | cached / skipped | pipeline load (s) | encoding (s) | of which VAE "
            "| of which text encoders | of which the rest | CPU / wall | files/s (load excluded) | files per CPU s "
            "(load excluded) | bytes/sample on disk |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]


def share_table(runs: dict[str, list[CacheRun]]) -> list[str]:
    rows = []
    for family, family_runs in runs.items():
        run = family_runs[-1]
        data = sum(run.tensor_bytes.values())
        for name, total in sorted(run.tensor_bytes.items()):
            rows.append(f"| {family} | {name} | {human(total / run.samples)} | {100 * total / run.shard_bytes:.1f} % |")
        rows.append(f"| {family} | (headers, metadata) | {human((run.shard_bytes - data) / run.samples)} | "
                    f"{100 * (run.shard_bytes - data) / run.shard_bytes:.1f} % |")
    return ["| family | cached tensor | bytes/sample | share of the shards |", "|---|---|---|---|", *rows]


def rank_name(rank: int) -> str:
    return "full" if rank == 0 else f"LoRA r={rank}"


def tiny_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        f"| {r['dtype']} | {rank_name(r['rank'])} | {count(r['trainable'])} / {count(r['params'])} "
        f"({100 * r['trainable'] / r['params']:.1f} %) | {r['trainable_dtype']} | {r['frozen_dtype']} "
        f"| {human(r['param_bytes'])} | {human(r['trainable_bytes'])} | {human(r['grad_bytes'])} "
        f"| {human(r['state_bytes'])} ({r['state_dtype']}) | {'yes' if r['state_bytes'] == r['state_predicted'] else 'NO'} "
        f"| {r['loss']:.4f} |"
        for r in results
    ]
    return ["| base dtype | training | trainable / total params | trainable dtype | frozen dtype | all weights "
            "| trainable weights | gradients | AdamW state, measured (dtypes) | state = 2 x trainable + 4 B/tensor? "
            "| loss of the step |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows]


def dev_table(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        check = "-" if r["rank"] == 0 else ("yes" if r["lora_added"] == r["lora_from_shapes"] else "NO")
        rows.append(
            f"| {r['dtype']} | {rank_name(r['rank'])} | {count(r['trainable'])} / {count(r['params'])} "
            f"({100 * r['trainable'] / r['params']:.2f} %) | {check} | {r['trainable_dtype']} | {human(r['param_bytes'])} "
            f"| {human(r['grad_bytes'])} | {human(r['state_bytes'])} | {total(r)} |"
        )
    return ["| base dtype | training | trainable / total params | adapters = r x (in + out) of the targeted Linears? "
            "| trainable dtype | all weights | gradients | AdamW state (computed) | weights + gradients + state |",
            "|---|---|---|---|---|---|---|---|---|", *rows]


def total(r: dict[str, Any]) -> str:
    """What training holds besides activations: weights, gradients and optimizer state."""
    return human(r["param_bytes"] + r["grad_bytes"] + r["state_bytes"])


def families_table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = []
    for family, (full, lora) in results.items():
        check = "yes" if lora["lora_added"] == lora["lora_from_shapes"] else "NO"
        rows.append(f"| {family} | {family_of(family).transformer_class.__name__} | {count(full['params'])} | {total(full)} "
                    f"| {count(lora['trainable'])} ({check}) | {total(lora)} |")
    return [f"| family | transformer | parameters | full fine-tuning: weights + gradients + state | LoRA r={FAMILY_RANK} "
            "adapters (= r x (in + out)?) | LoRA: weights + gradients + state |", "|---|---|---|---|---|---|", *rows]


def main(out: Path = ROOT / "benchmarks" / "results") -> None:
    """Run both parts and write ``finetune.md`` and ``finetune.json`` into ``out``."""
    start = time.perf_counter()
    # One thread: the tiny tensors gain nothing from a second one, and two OpenMP threads on 2 cores collapse
    # (about ten times slower in a trial here) as soon as anything else runs on the machine.
    torch.set_num_threads(THREADS)
    runs: dict[str, list[CacheRun]] = {}
    folders: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in sorted(FAMILIES):
            pipeline = build_tiny_pipeline(family, root / f"{family}_pipeline")
            folders[family] = media_folder(root / f"{family}_media", family)
            runs[family] = [encode(family, pipeline, root / f"{family}_media", root / f"{family}_cache_{i}")
                            for i in range(CACHE_RUNS)]
        tiny = [tiny_step(root / "flux_pipeline", root / "flux_cache_0", dtype, rank)
                for dtype in DTYPES for rank in RANKS]
    dev = [meta_counts(diffusers.FluxTransformer2DModel, FLUX_DEV, dtype, rank) for dtype in DTYPES for rank in RANKS]
    published = {family: [meta_counts(FAMILIES[family].transformer_class, published_config(family), "bfloat16", rank)
                          for rank in (0, FAMILY_RANK)] for family in sorted(FAMILIES)}
    runtime = time.perf_counter() - start
    targets = ", ".join(LoraSettings().target_modules)
    report = "\n".join([
        "# Fine-tuning costs: latent-cache throughput and size, LoRA vs full fine-tuning memory",
        "",
        f"{describe(COMMAND)} {runtime:.0f} s after the imports, torch threads: {THREADS} (timings depend on the "
        "machine and on what else runs on it).",
        "",
        f"## Latent cache (`prepare.py`'s `encode_folder`), one process, {THREADS} thread",
        "",
        "The tiny offline pipelines of `fixtures/pipelines.py` (float32) encode `fixtures/media.py`'s folder padded "
        "with copies of its good files (captions included); the bad files are its corrupt and uncaptioned ones, "
        f"(and, for edit families, samples without a reference image), which are skipped. Buckets: images "
        f"{BUCKETS[False]['resolutions']} x frames {BUCKETS[False]['frames']}, videos {BUCKETS[True]['resolutions']} x "
        f"frames {BUCKETS[True]['frames']} ({FRAMES}-frame GIFs). Each run fills a "
        "fresh cache (the two show the run-to-run spread; run 1 also pays any one-time costs). The pipeline load is timed inside the call and **excluded** "
        "from files/s (encoding = the call's wall time minus the load: listing the folder, checking the buckets, "
        "reading, encoding and writing the shards), split into the time inside the family's `encode_pixels` (VAE; "
        "reference images and image-to-video conditions included), `encode_prompts` (tokenisers and text encoders, "
        "one prompt per call, at the length the pipeline's own call uses) and the rest (listing, decoding, "
        "bucketing, resizing, shard writes; the CLIP image encoder of image-to-video). "
        "**The encoders here are tiny, so files/s measures the code path and the per-call overhead of running "
        "small models one file at a time, not a real VAE's or T5's compute**, which is orders of magnitude "
        "larger: with real encoders files/s is far lower, and the rest column is the part of the time that "
        "stays. CPU / wall: this process's CPU time over the call's wall time; with one thread, well under 1 means "
        "other work on the machine took the cores and the rate is low for that reason; files per CPU second "
        "is the rate with that taken out (nearly: other work still shares caches and memory bandwidth). Bytes/sample = the shards' "
        "sizes on disk / samples.",
        "",
        *cache_table(runs, folders),
        "",
        f"Where a sample's bytes go (last run): the prompt embeddings are stored at the length the "
        f"pipelines' own call encodes to ({MAX_SEQUENCE_LENGTH} T5 or Qwen tokens), padding included, so at the tiny models' widths they outweigh the "
        "latents; with Flux.1-dev's T5 "
        f"({MAX_SEQUENCE_LENGTH} x {FLUX_DEV['joint_attention_dim']}) they alone would take "
        f"{human(MAX_SEQUENCE_LENGTH * FLUX_DEV['joint_attention_dim'] * 4)} per sample in float32, "
        f"{human(MAX_SEQUENCE_LENGTH * FLUX_DEV['joint_attention_dim'] * 2)} in bfloat16.",
        "",
        *share_table(runs),
        "",
        "## LoRA vs full fine-tuning: the tiny pretrained Flux transformer, measured",
        "",
        "`FlowMatching(ModelConfig(family='flux', pretrained_path=<tiny pipeline>, dtype=...), OptimizerConfig(), 0, "
        f"LoraSettings(rank=r))`, LoRA targets {targets}; one real step: the loss of "
        "`BucketBatches(LatentCache(cache), 1)[0]`, `backward()`, AdamW `step()`. Every figure counts the tensors "
        "themselves: parameters, `.grad` of the trainable ones (the run checks that no frozen weight holds one), "
        "and every tensor "
        "in `optimizer.state` (`exp_avg`, `exp_avg_sq`, `step`). The state check compares the measurement with "
        "the rule used for Flux.1-dev below. torch's AdamW keeps the moments in each parameter's dtype, so a full "
        "fine-tune of a bfloat16 base keeps bfloat16 moments (and no float32 copy of the weights), while LoRA's "
        "adapters, cast to float32 by `add_lora`, keep float32 ones. LoRA's B matrices start at zero, so the first "
        "loss is the base model's (the batch is the cache's first, whose file depends on the shards' random names, "
        "so the loss differs between runs of this benchmark).",
        "",
        *tiny_table(tiny),
        "",
        "## LoRA vs full fine-tuning: Flux.1-dev's configuration, computed",
        "",
        f"`FluxTransformer2DModel(**{FLUX_DEV})` built on the meta device (no weights, no download), cast to the "
        "base dtype, then `recipe.lora.add_lora` with the same settings (peft adds the adapters on the meta "
        "device too; parameter devices: "
        f"{', '.join(sorted({d for r in dev for d in r['devices']}))}). Parameter counts and weight bytes are "
        "read from the model; the adapter count is checked against r x (in + out) summed over the targeted "
        "Linear layers' shapes. Gradients = the trainable weights' bytes. **AdamW state is computed from the "
        "counts, not measured**: 2 tensors like each trainable parameter + a 4-byte step per tensor, the rule "
        "the tiny measurement above confirms. Activations are not included (they depend on the sequence; see "
        "the other benchmarks).",
        "",
        *dev_table(dev),
        "",
        "## LoRA vs full fine-tuning: every family's published transformer, computed",
        "",
        "Each family's transformer at its class's real configuration in `fixtures/dits` (the one "
        "`tests/test_real_configs.py` resolves plans for; Flux Kontext shares Flux.1-dev's, Wan image-to-video is "
        f"Wan2.1-I2V-14B's: {PUBLISHED['wan_i2v']} over Wan's; Flux.2 Klein is FLUX.2 [klein] 4B's: "
        f"{PUBLISHED['flux2_klein']} over Flux.2's), built on the meta device in bfloat16, fully trained "
        f"or with LoRA r={FAMILY_RANK} on {targets}; bytes counted as in the Flux.1-dev table.",
        "",
        *families_table(published),
        "",
    ])
    (out / "finetune.md").write_text(report)
    raw = {**record(COMMAND), "runtime_s": runtime, "threads": THREADS,
           "cache": {f: [{**vars(r), "rate": r.rate, "cpu_rate": r.cpu_rate} for r in rs] for f, rs in runs.items()}, "folders": folders,
           "tiny_flux": tiny, "flux_dev": dev, "published": published}
    (out / "finetune.json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
