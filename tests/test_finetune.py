"""Fine-tuning a pretrained pipeline end to end: media folder -> latent cache -> LoRA under CP -> pipeline.

Each family's tiny pipeline (Flux, Flux Kontext, Chroma, QwenImage, QwenImage Edit and Edit Plus (some samples with
two references), Z-Image, Flux.2 images; Wan video) is built offline with seeded weights (``fixtures/pipelines.py``) next to a captioned folder
holding one corrupt and one uncaptioned file (``fixtures/media.py``; for the edit families, reference
images and a file without one). ``prepare.py`` caches them (Wan's over two ranks) and says which files it skipped
and why; LoRA training from the cache under ring 2 and ulysses 2 x dp 2 matches
the same training on one process; resuming from a mid-run checkpoint continues exactly; and
``train.py``'s adapters load into the pipeline with ``load_lora_weights`` and generate what the
run's own validation sample showed.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import subprocess
import sys
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from launcher import run_distributed
from PIL import Image

from recipe.cache import BucketBatches, LatentCache, shard_files, shard_samples
from recipe.families import family as find_family
from recipe.flow_matching import FlowMatching, OptimizerConfig
from recipe.latents import LatentsConfig, encode_folder, latent_cache
from recipe.lora import LoraSettings
from recipe.media import read_frames
from recipe.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(rank=4, alpha=8)
# AdamW as users train; SGD, whose step is the gradient itself, shows a scale error AdamW's normalisation hides.
OPTIMIZERS = {"adamw": OptimizerConfig(lr=1e-2, warmup_steps=1),
              "sgd": OptimizerConfig(name="sgd", lr=1.0, warmup_steps=1)}
STEPS = 3
# pixel sizes of the tiny pipelines' buckets: Flux (VAE factor 2, 2x2 packing) and Wan (16, 4k+1 frames)
DATA = {"flux": ["data.resolutions=[[64,64],[48,80],[80,48]]", "data.frames=[1]"],
        "chroma": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "flux_kontext": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "qwenimage": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "qwenimage_edit": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "qwenimage_edit_plus": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "zimage": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "wan": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "wan_i2v": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "sd3": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "ltx": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "ltx_i2v": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[5]"],
        "hunyuanvideo15": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "hunyuanvideo15_i2v": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "cogvideox": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "hunyuanvideo": ["data.resolutions=[[32,32],[32,48]]", "data.frames=[1,5]"],
        "flux2": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"],
        "flux2_klein": ["data.resolutions=[[64,64],[48,80]]", "data.frames=[1]"]}
MEDIA = {"flux": "images", "chroma": "images", "zimage": "images", "wan": "videos", "flux_kontext": "images",
         "qwenimage": "images", "qwenimage_edit": "images", "qwenimage_edit_plus": "images", "wan_i2v": "videos",
         "sd3": "images",
         "ltx": "videos", "ltx_i2v": "videos", "hunyuanvideo15": "videos", "hunyuanvideo15_i2v": "videos",
         "cogvideox": "videos", "hunyuanvideo": "videos", "flux2": "images", "flux2_klein": "images"}


def media_references(family: str) -> int:
    """The reference images the fixture's media give each sample of ``family``: none, one (edit tasks), or up to two
    (a family that edits with several images: some samples have two)."""
    chosen = find_family(family)
    return 0 if not chosen.reference else 1 if chosen.max_references == 1 else 2


def prepare(family: str, pipeline: Path, media: Path, cache: Path, ranks: int = 1,
            data: list[str] | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    command = [*launcher, str(ROOT / "prepare.py"), f"model={family}", f"model.pretrained_path={pipeline}",
               "model.dtype=float32", f"data.path={media}", f"data.cache={cache}", "data.shard_size=2",
               *(DATA[family] if data is None else data)]
    return subprocess.run(command, cwd=cache.parent, capture_output=True, text=True, timeout=300)


def prepare_here(family: str, pipeline: Path, media: Path, cache: Path) -> str:
    """``prepare.py``'s work on one rank, in this process: its config composed from the same overrides and
    ``encode_folder`` run on it; what it logged. The fixture caches most families so, sparing a Python start per
    family; the one it caches over two ranks goes through ``prepare.py`` under torchrun."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipe.config import register_configs

    register_configs()
    overrides = [f"model={family}", f"model.pretrained_path={pipeline}", "model.dtype=float32", f"data.path={media}",
                 f"data.cache={cache}", "data.shard_size=2", *DATA[family]]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides)
    handler = BufferingHandler(capacity=10_000)  # flushes (empties) only when full
    logger = logging.getLogger("recipe.latents")
    logger.addHandler(handler)
    try:
        encode_folder(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.data))
    finally:
        logger.removeHandler(handler)
    return "\n".join(record.getMessage() for record in handler.buffer)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per family: the pipeline folder, the media (with the fixture's list of good/bad files), the cache, prepare's log."""
    from fixtures.media import write_media
    from fixtures.pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("finetune")
    made = {}
    for family, ranks in (("flux", 1), ("wan", 2), ("chroma", 1), ("zimage", 1), ("flux_kontext", 1), ("qwenimage", 1),
                           ("qwenimage_edit", 1), ("qwenimage_edit_plus", 1), ("wan_i2v", 1), ("sd3", 1), ("ltx", 1),
                           ("ltx_i2v", 1),
                           ("hunyuanvideo15", 1),
                           ("hunyuanvideo15_i2v", 1), ("cogvideox", 1), ("hunyuanvideo", 1), ("flux2", 1),
                           ("flux2_klein", 1)):
        pipeline = build_tiny_pipeline(family, root / f"{family}_pipeline")
        media = root / f"{family}_media"
        files = write_media(media, MEDIA[family], references=media_references(family))
        cache = root / f"{family}_cache"
        if ranks == 1:
            log = prepare_here(family, pipeline, media, cache)
        else:
            result = prepare(family, pipeline, media, cache, ranks)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            log = result.stdout + result.stderr
        made[family] = {"pipeline": pipeline, "media": media, "files": files, "cache": cache, "log": log}
    return made


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["flux", "wan", "chroma", "zimage", "flux_kontext", "qwenimage",
                                    "qwenimage_edit", "qwenimage_edit_plus", "wan_i2v",
                                    "sd3", "ltx", "ltx_i2v", "hunyuanvideo15", "hunyuanvideo15_i2v", "cogvideox",
                                    "hunyuanvideo", "flux2", "flux2_klein"])
def test_prepare_caches_every_captioned_file_in_buckets_and_names_the_bad_ones(made: dict[str, Any], family: str) -> None:
    case = made[family]
    cache = LatentCache(case["cache"])
    cached = {sample["file"] for shard in shard_files(case["cache"]) for sample in shard_samples(shard)}
    assert cached == set(case["files"]["good"])
    for bad in case["files"]["corrupt"]:
        assert f"skipped {case['media'] / bad}: cannot be read" in case["log"]
    for bad in case["files"]["uncaptioned"]:
        assert f"skipped {case['media'] / bad}: no caption" in case["log"]
    for bad in case["files"].get("unreferenced", []):  # edit tasks: a sample without its reference image
        assert f"skipped {case['media'] / bad}: no reference image: write {Path(bad).stem}.ref.png" in case["log"]
    shapes = {cache.shape(i) for i in range(len(cache))}
    assert len(shapes) >= 2, f"one bucket only: {shapes}"  # the fixture's media have two or three aspect ratios
    sample = cache[0]
    # the length the pipeline's own call encodes to: T5 or Qwen at 512 tokens; SD3's two CLIPs' 77, then T5's 256;
    # LTX's T5 at 128; CogVideoX's at 226; HunyuanVideo 1.5's Qwen2.5-VL at 1000 (its ByT5 at 256); HunyuanVideo's
    # LLaMA at 256 after its template's crop; QwenImage Edit's at 512 after the reference's vision tokens (16 of a
    # square one, 15 of a landscape one, at the fixture's 112 x 112 pixels at most); QwenImage Edit Plus's after its
    # references' (9 of a square one, 15 of a landscape one: about 384 x 384 pixels, then the processor's limit)
    plus = {((1, 4, 8, 8), 1): 9, ((1, 4, 8, 8), 2): 18, ((1, 4, 6, 10), 1): 15}.get(cache.bucket(0), 0)
    length = {"sd3": 77 + 256, "ltx": 128, "ltx_i2v": 128, "cogvideox": 226, "hunyuanvideo15": 1000,
              "hunyuanvideo15_i2v": 1000, "hunyuanvideo": 256,
              "qwenimage_edit": 512 + (16 if sample["latents"].shape[-1] == sample["latents"].shape[-2] else 15),
              "qwenimage_edit_plus": 512 + plus}.get(family, 512)
    assert sample["prompt_embeds"].shape[0] == length
    if family in ("wan", "wan_i2v", "ltx", "ltx_i2v", "hunyuanvideo15", "hunyuanvideo15_i2v", "cogvideox",
                  "hunyuanvideo"):  # 4x in time (the tiny VAEs', like Wan's)
        assert {shape[0] for shape in shapes} == {2}, "9-frame clips take the 5-frame bucket: 2 latent frames"
    if family == "wan_i2v":  # the first frame's latents after the mask (1 on the first latent frame), its CLIP embedding
        condition = sample["condition"]
        assert condition.shape == (2, 4 + sample["latents"].shape[1], *sample["latents"].shape[2:])
        assert bool((condition[0, :4] == 1).all()) and bool((condition[1, :4] == 0).all())
        assert sample["image_embeds"].shape[-1] == 16
    if family in ("zimage", "qwenimage", "qwenimage_edit", "qwenimage_edit_plus"):  # each prompt's own tokens, padded
        assert sample["prompt_attention_mask"].dtype == torch.bool and 0 < int(sample["prompt_attention_mask"].sum()) < 512
    if family == "ltx_i2v":  # the clip's first frame encoded alone: the latent frame the pipeline gives clean
        assert sample["condition"].shape == (1, *sample["latents"].shape[1:])
    if family == "hunyuanvideo15_i2v":  # the first frame's latents alone and its 16 SigLIP tokens
        assert sample["condition"].shape == (1, *sample["latents"].shape[1:]) and sample["image_embeds"].shape == (16, 16)
    if family == "hunyuanvideo15":  # the prompt's tokens after the template, and no quoted glyph text: ByT5's all masked
        assert 0 < int(sample["prompt_attention_mask"].sum()) < 1000
        assert sample["prompt_embeds_2"].shape == (256, 16) and not bool(sample["prompt_attention_mask_2"].any())
    if family == "hunyuanvideo":
        prompts_as_hunyuanvideo_encodes_them(case, cache)
    if family == "flux_kontext":  # the reference image, fitted to the sample's bucket and encoded like it
        assert all(cache[i]["reference_latents"].shape == cache[i]["latents"].shape for i in range(len(cache)))
        assert not torch.equal(sample["reference_latents"], sample["latents"])
    if family == "qwenimage_edit":
        edits_as_the_pipeline_does(case, cache)
    if family == "qwenimage_edit_plus":
        edits_with_several_images_as_the_pipeline_does(case, cache)
    if family == "cogvideox":  # the call's prompt (T5 padded to 226, no mask) and the VAE's mode times its scaling factor
        encodes_as_the_pipeline_does(case, cache)
    if family in ("flux2", "flux2_klein"):
        flux2_as_the_pipeline_does(family, case, cache)
    if family == "chroma":  # the prompt's tokens and the first padding token attend (ChromaPipeline's own mask)
        mask = sample["prompt_attention_mask"]
        assert mask.shape == (512,) and 2 <= int(mask.sum()) < 512 and bool(mask[: int(mask.sum())].all())


def cached_samples(cache: Path) -> list[dict[str, Any]]:
    """The cache's samples' records (file, caption, shape) in ``LatentCache``'s order: by source file."""
    return sorted((sample for shard in shard_files(cache) for sample in shard_samples(shard)),
                  key=lambda sample: sample["file"])


def encodes_as_the_pipeline_does(case: dict[str, Any], cache: LatentCache) -> None:
    """CogVideoX's cache holds, for its first sample, what ``CogVideoXPipeline`` computes: the prompt its
    ``encode_prompt`` gives the call, and the latents its ``decode_latents`` turns back into the clip, exactly."""
    from recipe.media import choose_bucket, to_pixels

    pipeline = family_pipeline("cogvideox").from_pretrained(case["pipeline"])
    sample = cached_samples(case["cache"])[0]
    cached = cache[0]
    frames = read_frames(case["media"] / sample["file"])
    pixels = to_pixels(frames, choose_bucket(frames, [(32, 32), (32, 48)], [1, 5]))
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt(sample["caption"], do_classifier_free_guidance=False)
        video = pixels.transpose(0, 1)[None]  # (1, 3, F, H, W)
        latents = pipeline.vae.encode(video).latent_dist.mode() * pipeline.vae_scaling_factor_image
    assert torch.equal(cached["prompt_embeds"], embeds[0]), "the cached prompt is not the pipeline's"
    assert torch.equal(cached["latents"], latents[0].transpose(0, 1)), "the cached latents are not the pipeline's"


def prompts_as_hunyuanvideo_encodes_them(case: dict[str, Any], cache: LatentCache) -> None:
    """HunyuanVideo's cache holds, for every sample, what ``HunyuanVideoPipeline.encode_prompt`` returns for its caption
    at the call's 256 tokens, exactly: the LLaMA tokens after the template's ``crop_start`` are the caption's words and
    the turn's end (the fixture's tokenizer keeps each word one token), marked at the start of the mask; CLIP's
    pooled embedding."""
    pipeline = family_pipeline("hunyuanvideo").from_pretrained(case["pipeline"])
    samples = cached_samples(case["cache"])
    for index, sample in enumerate(samples):
        cached = cache[index]
        with torch.no_grad():
            embeds, pooled, mask = pipeline.encode_prompt(sample["caption"])
        real = len(sample["caption"].split()) + 1  # the caption's words and <|eot_id|>
        assert int(mask.sum()) == real and bool(cached["prompt_attention_mask"][:real].all())
        assert torch.equal(cached["prompt_attention_mask"], mask[0].bool())
        assert torch.equal(cached["prompt_embeds"], embeds[0]), "the cached prompt is not the pipeline's"
        assert torch.equal(cached["pooled_prompt_embeds"], pooled[0]), "the cached pooled prompt is not the pipeline's"


def edits_as_the_pipeline_does(case: dict[str, Any], cache: LatentCache) -> None:
    """QwenImage Edit's cache holds, for one sample of each bucket, what ``QwenImageEditPipeline`` computes from the
    sample's reference image fitted to the size its ``__call__`` gives an image of the bucket's aspect ratio (about
    1024 x 1024 pixels): the prompt encoded with that image (``encode_prompt``), and its latents (``prepare_latents``'
    image latents, packed), exactly."""
    from recipe.media import Bucket, to_pixels

    chosen = find_family("qwenimage_edit")
    pipeline = family_pipeline("qwenimage_edit").from_pretrained(case["pipeline"])
    samples = cached_samples(case["cache"])
    # the buckets' sizes the pipeline resizes to: 1024 x 1024 for a square image, 1312 x 800 for a 80 x 48 one
    sizes = {(8, 8): (1024, 1024), (6, 10): (800, 1312)}
    firsts = {tuple(cache.shape(i)[-2:]): i for i in reversed(range(len(cache)))}
    assert set(firsts) == set(sizes), firsts
    for grid, index in firsts.items():
        cached, sample = cache[index], samples[index]
        height, width = sizes[grid]
        assert chosen.reference_size(8 * grid[0], 8 * grid[1]) == (height, width)
        assert cached["reference_latents"].shape == (1, 4, height // 8, width // 8)
        reference = read_frames(case["media"] / f"{Path(sample['file']).stem}.ref.png")
        pixels = to_pixels(reference, Bucket(1, height, width))  # as prepare.py fits it
        image = pipeline.image_processor.postprocess(pixels, output_type="pil")[0]
        with torch.no_grad():
            embeds, _ = pipeline.encode_prompt(sample["caption"], image=image)
            _, image_latents = pipeline.prepare_latents(
                pipeline.image_processor.preprocess(image, height, width).unsqueeze(2), 1, 4, 8 * grid[0], 8 * grid[1],
                embeds.dtype, "cpu", None)
        mask = cached["prompt_attention_mask"]
        assert int(mask.sum()) == embeds.shape[1] and bool(mask[: embeds.shape[1]].all())
        assert torch.equal(cached["prompt_embeds"][mask], embeds[0]), "the cached prompt is not the pipeline's"
        tokens, _ = chosen.image_tokens(pipeline.transformer, cached["reference_latents"])
        assert torch.equal(tokens, image_latents), "the cached reference is not the pipeline's image latents"


def edits_with_several_images_as_the_pipeline_does(case: dict[str, Any], cache: LatentCache) -> None:
    """QwenImage Edit Plus's cache holds, for one sample of each bucket (shape and number of references: one square
    sample has two square references, so nothing of them is cropped), what ``QwenImageEditPlusPipeline.__call__``
    computes from the sample's references, each centre-cropped to the bucket's aspect ratio: each resized to about
    384 x 384 pixels for the text encoder and the prompt encoded with them all (``encode_prompt(caption,
    image=[...])``), each resized to about 1024 x 1024 for the VAE and their packed latents concatenated
    (``prepare_latents``), exactly; and the family's velocity is the transformer called as the pipeline's loop
    calls it (the target's tokens, then the references', their ``img_shapes``; the output's target tokens)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        VAE_IMAGE_SIZE,
        calculate_dimensions,
    )

    from recipe.families.qwenimage_edit_plus import crop_to_aspect

    chosen = find_family("qwenimage_edit_plus")
    pipeline = family_pipeline("qwenimage_edit_plus").from_pretrained(case["pipeline"])
    samples = cached_samples(case["cache"])
    firsts = {cache.bucket(i): i for i in reversed(range(len(cache)))}
    assert set(firsts) == {((1, 4, 8, 8), 1), ((1, 4, 6, 10), 1), ((1, 4, 8, 8), 2)}, firsts
    uncropped = 0
    for (shape, count), index in firsts.items():
        cached, sample = cache[index], samples[index]
        rows, cols = shape[-2:]
        height, width = 8 * rows, 8 * cols  # the sample's pixels (the tiny VAE's 8x)
        stem = Path(sample["file"]).stem
        names = [f"{stem}.ref.png", *(f"{stem}.ref{n}.png" for n in range(2, count + 1))]
        raw = [read_frames(case["media"] / name)[0] for name in names]
        images = [crop_to_aspect(image, height, width) for image in raw]
        uncropped += all(image is original for image, original in zip(images, raw))
        conditions, vae_images, vae_sizes = [], [], []
        for image in images:  # __call__'s own sizing, from each image's aspect ratio
            condition_width, condition_height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
            vae_width, vae_height = calculate_dimensions(VAE_IMAGE_SIZE, image.width / image.height)
            conditions.append(pipeline.image_processor.resize(image, condition_height, condition_width))
            vae_images.append(pipeline.image_processor.preprocess(image, vae_height, vae_width).unsqueeze(2))
            vae_sizes.append((vae_height, vae_width))
        assert cached["reference_latents"].shape == (count, 4, vae_sizes[0][0] // 8, vae_sizes[0][1] // 8)
        t = torch.tensor([0.6])
        with torch.no_grad():
            embeds, mask = pipeline.encode_prompt(sample["caption"], image=conditions)
            latents, image_latents = pipeline.prepare_latents(vae_images, 1, 4, height, width, embeds.dtype, "cpu",
                                                              torch.Generator().manual_seed(0))
            shapes = [[(1, rows // 2, cols // 2), *((1, h // 16, w // 16) for h, w in vae_sizes)]]
            theirs = pipeline.transformer(hidden_states=torch.cat([latents, image_latents], 1), timestep=t,
                                          encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                          img_shapes=shapes).sample[:, : latents.shape[1]]
            x_t = pipeline._unpack_latents(latents, height, width, 8).transpose(1, 2)  # (1, F, C, H, W)
            text = {name: cached[name][None] for name in chosen.text_dims(pipeline.transformer)}
            ours = chosen.velocity(pipeline.transformer, x_t, t, text, 1.0)
        real = cached["prompt_attention_mask"]
        assert int(real.sum()) == embeds.shape[1] and bool(real[: embeds.shape[1]].all())
        assert torch.equal(cached["prompt_embeds"][real], embeds[0]), "the cached prompt is not the pipeline's"
        tokens = torch.cat([chosen.image_tokens(pipeline.transformer, latents[None])[0]
                            for latents in cached["reference_latents"]], 1)
        assert torch.equal(tokens, image_latents), "the cached references are not the pipeline's image latents"
        torch.testing.assert_close(ours.transpose(1, 2), pipeline._unpack_latents(theirs, height, width, 8),
                                   rtol=1e-5, atol=1e-6, msg="the velocity is not the pipeline's call")
    assert uncropped, "no sample's references are all of their bucket's aspect ratio: nothing is the pipeline's alone"


def flux2_as_the_pipeline_does(family: str, case: dict[str, Any], cache: LatentCache) -> None:
    """Flux.2's (and Klein's) cache holds, for one sample of each bucket, what the pipeline computes: the image's
    latents as its ``prepare_image_latents`` makes tokens of an image (2x2 patches, BatchNorm-normalised), the
    caption's 512 stacked text-encoder states (``encode_prompt``: Mistral3's, Klein's Qwen3's); and the family's
    velocity is the transformer called as the pipeline's loop calls it on those latents (``prepare_latents``' ids,
    ``encode_prompt``'s text ids, the guidance: Flux2Pipeline's scale, Klein's none), exactly."""
    from recipe.media import Bucket, to_pixels

    chosen = find_family(family)
    pipeline = family_pipeline(family).from_pretrained(case["pipeline"])
    guidance = torch.full([1], 3.5) if family == "flux2" else None
    samples = cached_samples(case["cache"])
    factor = chosen.spatial_multiple(pipeline)  # pixels per cached latent pixel
    firsts = {tuple(cache.shape(i)[-2:]): i for i in reversed(range(len(cache)))}
    assert set(firsts) == {(16, 16), (12, 20)}, firsts
    for (rows, cols), index in firsts.items():
        cached, sample = cache[index], samples[index]
        channels, height, width = cached["latents"].shape[1], factor * rows, factor * cols
        pixels = to_pixels(read_frames(case["media"] / sample["file"]), Bucket(1, height, width))  # as prepare.py
        t = torch.tensor([0.6])
        with torch.no_grad():
            tokens, _ = pipeline.prepare_image_latents([pixels], 1, None, "cpu", torch.float32)
            embeds, text_ids = pipeline.encode_prompt(sample["caption"])
            packed, image_ids = pipeline.prepare_latents(1, channels // 4, height, width, torch.float32, "cpu", None,
                                                         latents=cached["latents"])
            theirs = pipeline.transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=t,
                                          guidance=guidance, txt_ids=text_ids, img_ids=image_ids).sample
            ours = chosen.velocity(pipeline.transformer, cached["latents"][None], t,
                                   {"prompt_embeds": cached["prompt_embeds"][None]}, 3.5)
        assert torch.equal(tokens[0], cached["latents"][0].flatten(1).T), "the cached latents are not the pipeline's"
        assert torch.equal(cached["prompt_embeds"], embeds[0]), "the cached prompt is not the pipeline's"
        assert torch.equal(ours[:, 0].flatten(2).transpose(1, 2), theirs), "the velocity is not the pipeline's call"


@pytest.mark.timeout(300)
def test_prepare_resumes_after_a_crash_and_refuses_another_model(made: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from recipe.families.flux import Flux

    case = made["flux"]
    model = ModelConfig(family="flux", pretrained_path=str(case["pipeline"]), dtype="float32")
    data = LatentsConfig(cache=str(tmp_path / "cache"), path=str(case["media"]), resolutions=[[64, 64], [48, 80], [80, 48]],
                         shard_size=4)
    calls = []
    real = Flux.encode_prompts

    def crash_on_third(self: Flux, pipeline: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        calls.append(prompts)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(self, pipeline, prompts)

    monkeypatch.setattr(Flux, "encode_prompts", crash_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        encode_folder(model, data)
    assert len(LatentCache(tmp_path / "cache")) == 2, "the two files encoded before the crash were lost"
    monkeypatch.setattr(Flux, "encode_prompts", real)
    again = encode_folder(model, data)
    assert (again["present"], again["cached"]) == (2, len(case["files"]["good"]) - 2)
    assert encode_folder(model, data)["cached"] == 0
    wan = ModelConfig(family="wan", pretrained_path=str(made["wan"]["pipeline"]), dtype="float32")
    with pytest.raises(ValueError, match="was made with model.family=flux .* Use a new data.cache"):
        encode_folder(wan, LatentsConfig(cache=data.cache, path=str(made["wan"]["media"]), resolutions=[[32, 32]]))
    with pytest.raises(ValueError, match="holds flux latents .* but model.family=wan"):
        latent_cache(LatentsConfig(cache=data.cache), wan)
    with pytest.raises(FileNotFoundError, match="model.pretrained_path='.*nowhere' does not exist"):
        encode_folder(ModelConfig(family="flux", pretrained_path=str(tmp_path / "nowhere")), data)


def test_captions_and_references_come_from_sidecars_or_a_table(tmp_path: Path) -> None:
    from recipe.media import list_media

    image = Image.new("RGB", (8, 8))
    for name in ("a.png", "a.ref.png", "b.png", "c.png", "d.jpg", "d.ref.webp"):
        image.save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a cat\n")  # a sidecar caption wins over the table's
    rows = [{"file_name": "a.png", "text": "unused"}, {"file_name": "b.png", "text": "a dog", "reference": "c.png"},
            {"file_name": "c.png", "caption": "a bird"}, {"file_name": "d.jpg", "text": "a fish"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    items, skipped = list_media(tmp_path, references=True)
    assert [(i.file, i.caption, i.reference) for i in items] == [
        ("a.png", "a cat", "a.ref.png"), ("b.png", "a dog", "c.png"), ("d.jpg", "a fish", "d.ref.webp")]
    assert [(s.file, s.reason.split(":")[0]) for s in skipped] == [("c.png", "no reference image")]
    assert "write c.ref.png next to it or a 'reference' column" in skipped[0].reason
    items, skipped = list_media(tmp_path)  # text-to-image: no references, and reference images are never samples
    assert [(i.file, i.reference) for i in items] == [("a.png", None), ("b.png", None), ("c.png", None), ("d.jpg", None)]
    assert not skipped
    (tmp_path / "metadata.jsonl").unlink()
    with open(tmp_path / "captions.csv", "w", newline="") as table:
        csv.DictWriter(table, ["file_name", "caption", "reference"]).writerows(
            [{"file_name": "file_name", "caption": "caption", "reference": "reference"},
             {"file_name": "b.png", "caption": "a dog", "reference": "a.png"}])
    items, skipped = list_media(tmp_path, references=True)
    assert [(i.file, i.reference) for i in items] == [("a.png", "a.ref.png"), ("b.png", "a.png")]
    assert sorted(s.file for s in skipped) == ["c.png", "d.jpg"]  # no caption


def test_several_references_come_from_numbered_sidecars_or_columns_in_order(tmp_path: Path) -> None:
    """A family that edits with several images reads ``<name>.ref.<ext>``, ``<name>.ref2.<ext>``, ... (up to the first
    number missing), or the table's ``reference`` (a path or, in metadata.jsonl, a list), ``reference2``, ...
    columns; no reference image is a sample, and a sample without its first one is skipped, named."""
    from recipe.media import list_media

    image = Image.new("RGB", (8, 8))
    for name in ("a.png", "a.ref.png", "a.ref2.jpg", "a.ref3.png", "b.png", "b.ref2.png", "c.png", "d.png", "e.png",
                 "f.png", "g.png", "g.ref.png", "g.ref3.png"):
        image.save(tmp_path / name)
    rows = [{"file_name": "c.png", "text": "a bird", "reference": ["a.png", "e.png"]},
            {"file_name": "d.png", "text": "a fish", "reference": "e.png", "reference2": "f.png", "reference3": ""},
            {"file_name": "e.png", "text": "a car"}, {"file_name": "f.png", "text": "a ball", "reference": "e.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    for name in ("a", "b", "g"):
        (tmp_path / f"{name}.txt").write_text(f"{name} edited\n")
    items, skipped = list_media(tmp_path, references=True)
    assert [(i.file, i.references) for i in items] == [
        ("a.png", ("a.ref.png", "a.ref2.jpg", "a.ref3.png")), ("c.png", ("a.png", "e.png")),
        ("d.png", ("e.png", "f.png")), ("f.png", ("e.png",)), ("g.png", ("g.ref.png",))]  # g.ref3 follows no g.ref2
    assert items[0].reference == "a.ref.png"
    assert [(s.file, s.reason.split(":")[0]) for s in skipped] == [("b.png", "no reference image"),
                                                                   ("e.png", "no reference image")]
    items, _ = list_media(tmp_path)  # text-to-image: every numbered reference image is no sample either
    assert [i.file for i in items] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"]
    with open(tmp_path / "captions.csv", "w", newline="") as table:
        writer = csv.DictWriter(table, ["file_name", "caption", "reference", "reference2"])
        writer.writeheader()
        writer.writerow({"file_name": "c.png", "caption": "a bird", "reference": "e.png", "reference2": "f.png"})
    (tmp_path / "metadata.jsonl").unlink()
    items, _ = list_media(tmp_path, references=True)
    assert [(i.file, i.references) for i in items if i.file == "c.png"] == [("c.png", ("e.png", "f.png"))]


def test_an_edit_family_of_one_reference_skips_a_sample_with_several_naming_them(tmp_path: Path) -> None:
    from fixtures.pipelines import build_tiny_pipeline

    media = tmp_path / "media"
    media.mkdir()
    for name in ("a.png", "a.ref.png", "a.ref2.png", "b.png", "b.ref.png"):
        Image.new("RGB", (64, 64), "red").save(media / name)
    for name in ("a", "b"):
        (media / f"{name}.txt").write_text("a red cat\n")
    model = ModelConfig(family="flux_kontext", pretrained_path=str(build_tiny_pipeline("flux_kontext", tmp_path / "p")),
                        dtype="float32")
    done = encode_folder(model, LatentsConfig(cache=str(tmp_path / "cache"), path=str(media), resolutions=[[64, 64]]))
    assert done["cached"] == 1 and [(s.file, s.reason) for s in done["skipped"]] == [
        ("a.png", "2 reference images (a.ref.png, a.ref2.png); Flux Kontext edits with 1 at most")]


def test_buckets_a_pipeline_cannot_take_are_refused_naming_the_rule(made: dict[str, Any]) -> None:
    from recipe.latents import check_buckets, load_pipeline

    cases = {"wan": ([[32, 32]], [4], "frames must be 4k\\+1"), "ltx": ([[30, 32]], [5], "height and width must be multiples of 4"),
             "flux": ([[64, 64]], [5], "Flux takes images: frames must be 1"),
             "ltx_i2v": ([[32, 32]], [1], "LTX-Video image-to-video generates the frames after the first: frames must "
                                          "be more than 1"), "sd3": ([[62, 64]], [1], "height and width must be multiples of 4")}
    for family, (resolutions, frames, rule) in cases.items():
        model = ModelConfig(family=family, pretrained_path=str(made[family]["pipeline"]))
        data = LatentsConfig(resolutions=resolutions, frames=frames)
        with pytest.raises(ValueError, match=f"does not fit {family}: {rule}"):
            check_buckets(find_family(family), load_pipeline(model), data)


def test_wan_2_2_ti2v_trains_as_wan_its_per_token_timesteps_being_each_samples(tmp_path: Path) -> None:
    """Wan 2.2 TI2V-5B's text-to-video gives every token the sample's timestep (WanPipeline's expand_timesteps over
    an all-ones mask): the family's one timestep per sample computes the same velocity; its 16x VAE asks for
    multiples of 32."""
    from diffusers import WanPipeline

    from fixtures.pipelines import build_tiny_pipeline

    pipeline = WanPipeline.from_pretrained(build_tiny_pipeline("wan_ti2v", tmp_path / "pipeline"))
    wan = find_family("wan")
    assert wan.check_size(pipeline, 5, 48, 64) == "height and width must be multiples of 32"
    assert wan.check_size(pipeline, 5, 64, 96) is None
    latents = wan.encode_pixels(pipeline, torch.rand(5, 3, 64, 96) * 2 - 1)[None]  # (1, F', C, H', W')
    assert latents.shape == (1, 2, 8, 4, 6)
    text, transformer, t = wan.encode_prompts(pipeline, ["a red cat"]), pipeline.transformer, torch.tensor([0.6])
    ours = wan.velocity(transformer, latents, t, text, 1.0)
    video = latents.transpose(1, 2)  # the pipeline's loop: (B, C, F, H, W), a timestep per 2x2 patch
    per_token = (torch.ones_like(video)[0, 0][:, ::2, ::2] * t * 1000).flatten()[None]
    theirs = transformer(video, per_token, text["prompt_embeds"]).sample.transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, wan.velocity(transformer, latents, torch.tensor([0.3]), text, 1.0), atol=1e-3)


@pytest.mark.timeout(600)
def test_wan_2_2_ti2v_image_to_video_gives_the_first_frame_clean_as_the_pipeline_and_matches_one_process(
        tmp_path: Path) -> None:
    """Wan 2.2 TI2V-5B's image-to-video (WanImageToVideoPipeline with expand_timesteps) takes the image as the clean
    first latent frame with a timestep per token, zero on that frame's: the family's training input and velocity are
    the pipeline's, and its LoRA under ring 2 (Wan's plan splitting the per-token timesteps) matches one process."""
    from diffusers import WanImageToVideoPipeline

    from fixtures.media import write_media
    from fixtures.pipelines import build_tiny_pipeline

    pipeline_dir, media, cache = tmp_path / "pipeline", tmp_path / "media", tmp_path / "cache"
    build_tiny_pipeline("wan_ti2v_i2v", pipeline_dir)
    write_media(media, "videos")
    made = prepare("wan_i2v", pipeline_dir, media, cache, data=["data.resolutions=[[32,32],[32,64]]", "data.frames=[5]"])
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    sample, wan_i2v = LatentCache(cache)[0], find_family("wan_i2v")
    assert sample["first_frame"].shape == (1, *sample["latents"].shape[1:]) and "condition" not in sample

    pipeline = WanImageToVideoPipeline.from_pretrained(pipeline_dir)
    transformer, t = pipeline.transformer, torch.tensor([0.7])
    text = {name: sample[name][None] for name in wan_i2v.text_dims(transformer)}
    x0 = sample["latents"][None]
    x_t, given = wan_i2v.noisy_latents(x0, torch.randn_like(x0), t, text)
    assert given == 1 and torch.equal(x_t[:, :1], text["first_frame"])
    ours = wan_i2v.velocity(transformer, x_t, t, text, 1.0)
    video = x_t.transpose(1, 2)  # the pipeline's loop: (B, C, F, H, W), a timestep per 2x2 patch, zero on frame 0
    mask = torch.ones(1, 1, *video.shape[2:])
    mask[:, :, 0] = 0
    per_token = (mask[0][0][:, ::2, ::2] * t * 1000).flatten()[None]
    theirs = transformer(video, per_token, text["prompt_embeds"]).sample.transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    results = run_distributed(cache_fit, 2, "wan_i2v", str(pipeline_dir), str(cache), {"ring_degree": 2}, None, None,
                              None, "sgd", init_process_group=False, timeout=400)
    reference = one_process("wan_i2v", str(pipeline_dir), str(cache), 1, None, "sgd")
    check_against_one_process(results, reference, "wan 2.2 ti2v image-to-video, ring 2", tolerance("wan_i2v", "sgd"),
                              "sgd")


def test_cogvideox_trains_v_prediction_as_its_fine_tuning_scripts(made: dict[str, Any]) -> None:
    """CogVideoX was trained with v-prediction on its scheduler's DDPM schedule: the module draws integer timesteps
    uniform over the schedule's, noises with ``add_noise``, calls the transformer as the pipeline's loop does (its
    rotary table), and its loss is diffusers' train_cogvideox_lora.py's: the x0 that ``get_velocity`` makes of the
    output, against x0, weighted by ``1 / (1 - alphas_cumprod[t])``. The demo's Euler sampler and a folder without
    the scheduler are refused."""
    case = made["cogvideox"]
    module = build("cogvideox", str(case["pipeline"]))
    pipeline = family_pipeline("cogvideox").from_pretrained(case["pipeline"])
    batch = BucketBatches(LatentCache(case["cache"]), 2)[0]
    x0, draws = batch["latents"], int(module.draws)
    loss = module(batch)
    module.draws.fill_(draws)
    noise, t = module.noise_and_times(batch["index"], x0)
    scheduler = pipeline.scheduler
    x_t = scheduler.add_noise(x0, noise, t)
    frames, height, width = x0.shape[1], x0.shape[3] * 8, x0.shape[4] * 8  # the call's pixel size
    with torch.no_grad():  # the adapters start at zero: the base transformer's output
        output = pipeline.transformer(hidden_states=x_t, encoder_hidden_states=batch["prompt_embeds"], timestep=t,
                                      image_rotary_emb=pipeline._prepare_rotary_positional_embeddings(
                                          height, width, frames, "cpu")).sample
    weights = (1 / (1 - scheduler.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    script = torch.mean((weights * (scheduler.get_velocity(output, x_t, t) - x0) ** 2).reshape(len(x0), -1), 1).mean()
    torch.testing.assert_close(loss.detach().double(), script, rtol=1e-6, atol=0)
    times = torch.cat([module.noise_and_times(torch.tensor([i]), x0[:1])[1] for i in range(64)])
    assert times.dtype == torch.long and 0 <= int(times.min()) and int(times.max()) < 1000 and len(set(times.tolist())) > 50
    with pytest.raises(ValueError, match="trained with v-prediction on a DDPM schedule, whose predictions the demo's"):
        module.sample(torch.tensor([0]), tuple(x0.shape[1:]), 2)
    with pytest.raises(ValueError, match="has no scheduler/ .* point it at the CogVideoXPipeline folder"):
        build("cogvideox", str(case["pipeline"] / "transformer"))


def adapters(module: FlowMatching) -> dict[str, torch.Tensor]:
    return {name: weight.detach().clone() for name, weight in module.named_parameters() if weight.requires_grad}


def build(family: str, pipeline: str, expert: str | None = None, optimizer: str = "adamw",
          lora: LoraSettings = LORA) -> FlowMatching:
    """The recipe's module for ``family``'s pipeline in float32: LoRA, or full fine-tuning with ``lora.rank=0``."""
    import lightning as L

    L.seed_everything(0, verbose=False)  # the adapters' initial weights: the same in every run
    model = ModelConfig(family=family, pretrained_path=pipeline, dtype="float32", expert=expert)
    return FlowMatching(model, OPTIMIZERS[optimizer], 0, lora)


def gradients(module: FlowMatching) -> dict[str, torch.Tensor]:
    """The trainable weights' gradients; zeros for an expert no sample of the step used."""
    return {n: torch.zeros_like(w) if w.grad is None else w.grad.clone()
            for n, w in module.named_parameters() if w.requires_grad}


def cache_fit(family: str, pipeline: str, cache: str, layout: dict[str, int], checkpoints: str | None = None,
              resume: str | None = None, expert: str | None = None, optimizer: str = "adamw",
              lora: LoraSettings = LORA) -> dict[str, Any]:
    """Rank body: LoRA (or, at rank 0, full) training from the cache under ``ContextParallelStrategy(**layout)``, as
    train.py builds it."""
    import lightning as L
    from exact import quiet_trainer
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader

    from cp_plugin import ContextParallelStrategy

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.grads: dict[str, torch.Tensor] | None = None

        def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
            if self.grads is None:
                self.grads = gradients(module)

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
            self.losses.append(float(outputs["loss"]))

    module = build(family, pipeline, expert, optimizer, lora)
    before, record = adapters(module), Record()
    callbacks: list[Callback] = [record]
    if checkpoints:
        callbacks.append(ModelCheckpoint(checkpoints, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    trainer = quiet_trainer(ContextParallelStrategy(**layout, **module.ddp_options()), STEPS, enable_checkpointing=bool(checkpoints),
                            callbacks=callbacks)
    loader = DataLoader(BucketBatches(LatentCache(Path(cache)), 1), batch_size=None, shuffle=True)
    trainer.fit(module, loader, ckpt_path=resume)
    return {"before": before, "after": adapters(module), "losses": record.losses, "grads": record.grads,
            "dp": trainer.strategy.dp_size}


def one_process(family: str, pipeline: str, cache: str, dp: int, expert: str | None = None,
                optimizer: str = "adamw", lora: LoraSettings = LORA) -> dict[str, Any]:
    """The same training on one process: each step sums the dp ranks' batches (Lightning's DistributedSampler
    order, seed 0) with weight 1/dp, as DDP's gradient average does."""
    from torch.utils.data import DistributedSampler

    module = build(family, pipeline, expert, optimizer, lora)
    before = adapters(module)
    schedule = module.configure_optimizers()
    optimizer, warmup = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    batches = BucketBatches(LatentCache(Path(cache)), 1)
    samplers = [DistributedSampler(batches, num_replicas=dp, rank=r, shuffle=True, seed=0) for r in range(dp)]
    losses, grads = [], None
    for step in range(STEPS):
        epoch, position = divmod(step, len(samplers[0]))  # Lightning reshuffles each epoch with set_epoch
        step_losses = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            draws = int(module.draws)
            loss = module(batches[list(sampler)[position]])
            module.draws.fill_(draws)  # dp ranks draw in parallel: each at the same count
            (loss / dp).backward()
            step_losses.append(float(loss))
        module.draws += 1
        losses.append(step_losses)
        grads = grads or gradients(module)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
    return {"before": before, "after": adapters(module), "losses": losses, "grads": grads}


# Wan's cross-attention reads 512 text tokens, most of them T5 padding (zeros, so identical keys): the
# gradients of its key projection are sums that cancel to ~1e-3 of their terms, so reordering them (over
# sequence shards) moves them by ~1e-5 of their own size, and AdamW's first steps (about lr * sign) carry that
# into the updates. Measured: ulysses 2 x dp 2 gradients 2e-5, updates 3e-4; ring 2 6e-5 and 2.4e-3 (of the
# norm); dp 2 alone, 0. Flux (joint attention): gradients 6e-7, updates 8e-7 (ring 2) and 1.1e-5 (ulysses 2 x
# dp 2, AdamW again). QwenImage's last block: its text output is dropped, so its keys' gradients are small
# (to_k's LoRA B 0.004 of norm against 0.01-0.03 for q and v) and match to 3e-7 of their norm under ring 2, but
# to_k's LoRA A takes its first nonzero gradient at step 2 (B starts at zero), where AdamW's step is about
# lr * sign: measured updates 2.7e-3 of the norm (ring 2), 1.9e-5 (ulysses 2 x dp 2). QwenImage Edit runs the same
# transformer (the reference's 4096 tokens after the target's) and keeps QwenImage's AdamW bound for that cause;
# measured: gradients 2.2e-6, updates 4.9e-5 (ring 2) and 1.1e-5 (ulysses 2 x dp 2). CogVideoX (226 text tokens
# joined before the video's): gradients 1.9e-6 (ring 2) and 1.0e-6 (ulysses 2 x dp 2); its first block's to_q LoRA A
# takes its first nonzero gradient at step 2 (B starts at zero), where AdamW's step is about lr * sign: updates
# 5.1e-5 of the norm (ring 2), 2.1e-5 (ulysses 2 x dp 2), so its bound is 1e-4. HunyuanVideo's full fine-tuning under
# AdamW (ring 2) moves every weight, its text embedder's linear_1.bias worst at 6.7e-5 of the norm beyond the knee:
# that is float32's, not CP's. The same three steps on one process in float64 are 3.5e-5 from one process in float32
# and 1.1e-4 from ring 2 for that tensor (about 3x throughout, from the knee's entries moving step 2's gradients);
# under SGD ring 2 is within 1.2x of one process float32's distance from float64 in every tensor. So its bound is
# 1e-4 as CogVideoX's. Skipping CP anywhere is off by O(1).
TOLERANCE = {"flux": {"grads": 1e-5, "updates": 5e-5}, "chroma": {"grads": 1e-5, "updates": 5e-5},
             "zimage": {"grads": 1e-5, "updates": 5e-5}, "flux_kontext": {"grads": 1e-5, "updates": 5e-5},
             "qwenimage": {"grads": 1e-5, "updates": 1e-2}, "qwenimage_edit": {"grads": 1e-5, "updates": 1e-2},
             "qwenimage_edit_plus": {"grads": 1e-5, "updates": 1e-2},
             "wan": {"grads": 2e-4, "updates": 1e-2}, "wan_i2v": {"grads": 2e-4, "updates": 1e-2},
             "sd3": {"grads": 1e-5, "updates": 5e-5}, "ltx": {"grads": 1e-5, "updates": 5e-5},
             "ltx_i2v": {"grads": 1e-5, "updates": 5e-5}, "hunyuanvideo15": {"grads": 1e-5, "updates": 5e-5},
             "hunyuanvideo15_i2v": {"grads": 1e-5, "updates": 5e-5}, "cogvideox": {"grads": 1e-5, "updates": 1e-4},
             "hunyuanvideo": {"grads": 1e-5, "updates": 1e-4}, "flux2": {"grads": 1e-5, "updates": 5e-5},
             "flux2_klein": {"grads": 1e-5, "updates": 5e-5}}


# Under SGD a step is the learning rate times the gradient: no sign-like first steps amplify rounding noise, so
# QwenImage's updates match to 3e-6 (AdamW: 2.7e-3). Wan's cancelling key-projection gradients (above) still move
# by ~1e-5 of their size, and SGD at lr 1 carries that into the next steps' gradients: measured updates 1.1e-3
# (ring 2) and 2.1e-4 (ulysses 2 x dp 2), Wan I2V 1.7e-3 and 8.7e-5. CogVideoX's first block's to_k LoRA A moves
# little under SGD (its update's norm is 6e-4, B starting at zero), so float noise is a larger share of it: measured
# 4.9e-5 (ulysses 2 x dp 2), 2.0e-5 (ring 2).
SGD_UPDATES = {"wan": 1e-2, "wan_i2v": 1e-2, "cogvideox": 1e-4}


def tolerance(family: str, optimizer: str) -> dict[str, float]:
    """The bounds of ``family`` 's comparison with one process under ``optimizer``."""
    bound = TOLERANCE[family]
    return bound if optimizer == "adamw" else {"grads": bound["grads"], "updates": SGD_UPDATES.get(family, 5e-5)}


def rounding_noise(grads: dict[str, torch.Tensor], tolerance: float) -> set[str]:
    """The weights whose gradient is zero but for rounding: within ``tolerance`` of the largest gradient's norm.

    A key projection's bias is one (full fine-tuning): it shifts every key's score of a query alike, which softmax
    ignores, so one process and a parallel layout each get float noise there (measured 6e-12 against gradients of
    0.4), and its relative error says nothing. Its gradient is held to the tolerance of the largest instead; under
    SGD its update is as small as its gradient, under AdamW a step of about ``lr`` whose sign the noise decides."""
    largest = max(float(torch.linalg.vector_norm(grad)) for grad in grads.values())
    return {name for name, grad in grads.items() if 0 < float(torch.linalg.vector_norm(grad)) <= tolerance * largest}


# AdamW's first step is lr * g / (|g| + eps) (eps = 1e-8, torch's default): sign-like where |g| >> eps, but an entry
# whose gradient is near zero sits on the knee, where the step moves by lr * eps / (|g| + eps)^2 per unit of gradient
# (up to lr / eps). Float32 gives such an entry an absolute error of ~1e-9 (1e-9 of the largest gradient, well within
# the gradient tolerance), and the knee turns that into percents of lr. Measured (full fine-tuning, ring 2, AdamW):
# CogVideoX's first block's norm_k.bias has an entry with gradient 1.4e-8 on one process and 1.5e-8 under ring 2, whose
# steps differ by 0.022 lr: 3.1e-3 of the tensor's update norm; HunyuanVideo's first block's to_q.weight, 4.3e-4 from
# an entry with gradient 6e-9. It is float32's, not CP's: against the same training on one process in float64, one
# process in float32 is as far off (CogVideoX's norm_k.bias 2.0e-3, ring 2 1.1e-3). Step-1 errors were all in entries
# with |g| <= 100 eps (outside them step-1 updates match to 2e-7); such entries' different steps then move the next
# steps' gradients, and entries whose Adam moments nearly cancel (|g| of 1e-6 to 1e-5: CogVideoX's second block's
# norm_k.bias, 1.2e-4 at step 3) carry that on. So under AdamW the entries whose first gradient is nonzero and within
# 1000 eps of zero are left out of the update comparison (their first gradients are compared with the rest of the
# tensor's: 3% of CogVideoX's entries, 9% of HunyuanVideo's, 31% of Flux Kontext's, whose text side takes gradients of
# 1e-6 and less). Every other entry is held to the bound, and breaking CP is off by O(1) in them: ring attention that
# drops the other rank's dK/dV from step 2 on (the first step's gradients exact) gives CogVideoX AdamW updates 0.59 of
# their norm off (Flux Kontext SGD 0.83). With AdamW's eps at 1e-4 instead (no knee for 1e-9 noise to sit on), every
# update of CogVideoX and HunyuanVideo matches with no entry left out: 1.4e-5 of its norm at most, the rounding-noise
# key bias aside. HunyuanVideo's pooled text projection's bias stays over its 5e-5 at eps 1e-8 (6.7e-5 at step 3, from
# earlier knee entries' steps; 6.5e-6 and less at eps 1e-4).
ADAMW_KNEE = 1000 * 1e-8


def errors_against_one_process(results: list[dict[str, Any]], reference: dict[str, Any], tolerance: dict[str, float],
                               optimizer: str = "adamw") -> dict[str, Any]:
    """The largest relative loss, gradient and update errors over ranks (a dp replica reads its own losses), and the
    weights they are in: the one comparison ``check_against_one_process`` asserts on and ``benchmarks.families``
    reports.

    Gradients (the first step's) are relative to their norm per tensor. A weight whose gradient is rounding noise
    (``rounding_noise``: a key bias under full fine-tuning) has its gradient error taken relative to the largest
    gradient, its SGD update relative to the largest update, and no AdamW update; so has a weight no step moves (its
    gradient exactly zero: a branch the model leaves unused), which must stay put. Updates (after the steps, minus
    before) are relative to their norm per tensor, beyond the weights' float32 resolution (``update_error``: ``2 *
    STEPS`` ulps of the largest weight per entry: a weight that barely moves, e.g. HunyuanVideo's token refiner's
    to_k under SGD at 2e-4 of its norm, rounds differently in either run), under AdamW without the entries at its knee
    (``ADAMW_KNEE``)."""
    from exact import update_error

    norm = torch.linalg.vector_norm
    per_replica = len(results) // results[0]["dp"]
    noise = rounding_noise(reference["grads"], tolerance["grads"])
    largest = max(float(norm(grad)) for grad in reference["grads"].values())
    updates = {name: reference["after"][name] - before for name, before in results[0]["before"].items()}
    largest_update = max(float(norm(update)) for update in updates.values())
    worst: dict[str, Any] = {"loss": 0.0, "gradient": 0.0, "update": 0.0, "gradient_in": None, "update_in": None}
    for rank, result in enumerate(results):
        replica = rank // per_replica
        for mine, theirs in zip(result["losses"], reference["losses"]):
            worst["loss"] = max(worst["loss"], abs(mine - theirs[replica]) / abs(theirs[replica]))
        for name, grad in reference["grads"].items():
            if float(norm(grad)) == 0:  # lora_A's first gradient is zero (B starts at zero): exactly zero on both
                error, scale = float(norm(result["grads"][name])), largest
            else:
                error, scale = float(norm(result["grads"][name] - grad)), largest if name in noise else float(norm(grad))
            if error / scale > worst["gradient"]:
                worst["gradient"], worst["gradient_in"] = error / scale, f"rank {rank}: {name}"
        for name, before in result["before"].items():
            if name in noise and optimizer == "adamw":
                continue
            kept = slice(None)
            if optimizer == "adamw":
                first = reference["grads"][name].abs()
                kept = (first == 0) | (first > ADAMW_KNEE)  # an exactly zero gradient is zero on both: compared
                if not bool(kept.any()):
                    continue
            error, size, _ = update_error(result["after"][name][kept], reference["after"][name][kept], before[kept],
                                          STEPS, norm=True)
            scale = largest_update if name in noise or size == 0 else size
            if error / scale > worst["update"]:
                worst["update"], worst["update_in"] = error / scale, f"rank {rank}: {name}"
    return worst


def check_against_one_process(results: list[dict[str, Any]], reference: dict[str, Any], what: str,
                              tolerance: dict[str, float], optimizer: str = "adamw") -> None:
    """Losses within 1e-5, gradients and updates within ``tolerance`` (``errors_against_one_process``)."""
    worst = errors_against_one_process(results, reference, tolerance, optimizer)
    assert worst["loss"] <= 1e-5, f"{what}: losses differ by {worst['loss']:.1e}"
    assert worst["gradient"] <= tolerance["grads"], \
        f"{what}: gradient of {worst['gradient_in']} differs by {worst['gradient']:.1e} > {tolerance['grads']:.0e}"
    assert worst["update"] <= tolerance["updates"], \
        f"{what}: update of {worst['update_in']} differs by {worst['update']:.1e} > {tolerance['updates']:.0e}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("family", "layout", "optimizer"), [
    ("flux", {"ring_degree": 2}, "adamw"), ("wan", {"ulysses_degree": 2}, "adamw"),
    ("flux", {"ulysses_degree": 2}, "sgd"), ("wan", {"ring_degree": 2}, "sgd"),
    ("flux_kontext", {"ring_degree": 2}, "sgd"), ("qwenimage", {"ring_degree": 2}, "adamw"),
    ("wan_i2v", {"ulysses_degree": 2}, "sgd"), ("ltx_i2v", {"ulysses_degree": 2}, "adamw"),
    ("hunyuanvideo15_i2v", {"ring_degree": 2}, "sgd")])
def test_lora_from_the_cache_matches_one_process(made: dict[str, Any], family: str, layout: dict[str, int],
                                                 optimizer: str) -> None:
    """One family per way of conditioning, each layout and optimizer in turn: joint text and image tokens (Flux),
    cross-attention to padded text (Wan), reference tokens (Flux Kontext), masked joint text (QwenImage), condition
    channels and an image embedding (Wan I2V), a clean first frame with per-token timesteps (LTX I2V), two text
    encoders and an image slot (HunyuanVideo 1.5 I2V). ``python -m benchmarks.families`` runs every family with SGD
    and AdamW under both layouts (its table, in the README, is checked against its results by test_docs)."""
    case = made[family]
    world = 4 if "ulysses_degree" in layout else 2  # ulysses 2 x dp 2, or ring 2
    results = run_distributed(cache_fit, world, family, str(case["pipeline"]), str(case["cache"]), layout, None, None,
                              None, optimizer, init_process_group=False, timeout=400)
    reference = one_process(family, str(case["pipeline"]), str(case["cache"]), results[0]["dp"], None, optimizer)
    check_against_one_process(results, reference, f"{family} {optimizer} {layout} x dp {results[0]['dp']}",
                              tolerance(family, optimizer), optimizer)


@pytest.mark.timeout(600)
def test_full_fine_tuning_from_the_cache_matches_one_process(made: dict[str, Any]) -> None:
    """Every weight trains (``lora.rank=0``), QwenImage's with them: its last block's text branch takes no gradient,
    which DDP's static graph allows without a flag. ``python -m benchmarks.families`` runs it for every family with
    SGD and AdamW (measured here: gradients 5.5e-7, updates 2.2e-5 of their norms)."""
    case = made["qwenimage"]
    full = LoraSettings(rank=0)
    results = run_distributed(cache_fit, 2, "qwenimage", str(case["pipeline"]), str(case["cache"]), {"ring_degree": 2},
                              None, None, None, "sgd", full, init_process_group=False, timeout=600)
    reference = one_process("qwenimage", str(case["pipeline"]), str(case["cache"]), results[0]["dp"], None, "sgd", full)
    assert len(reference["grads"]) > 50, "not every weight trained"  # LoRA trains the attention projections' adapters
    check_against_one_process(results, reference, "qwenimage full fine-tuning sgd ring 2", tolerance("qwenimage", "sgd"),
                              "sgd")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan 2.2 A14B's layout in tiny: two experts split at boundary_ratio 0.72 (Wan's VAE and text encoder, so the
    Wan cache is its cache too)."""
    from fixtures.pipelines import build_tiny_pipeline

    return build_tiny_pipeline("wan_experts", tmp_path_factory.mktemp("experts") / "pipeline")


def test_each_expert_trains_only_on_its_own_noise_levels_and_the_choice_is_required(experts: Path,
                                                                                    made: dict[str, Any]) -> None:
    x0 = torch.zeros(1, 2, 4, 4, 4)
    for expert, trained in (("high", ["transformer"]), ("low", ["transformer_2"]),
                            ("both", ["transformer", "transformer_2"])):
        module = build("wan", str(experts), expert)
        assert list(module.components) == trained
        times = torch.cat([module.noise_and_times(torch.tensor([i]), x0)[1] for i in range(64)])
        if expert == "high":
            assert bool((times >= 0.72).all()), "the high-noise expert drew a time below the boundary"
        if expert == "low":
            assert bool((times < 0.72).all()), "the low-noise expert drew a time at or above the boundary"
        if expert == "both":
            assert 0 < int((times >= 0.72).sum()) < len(times)
    with pytest.raises(ValueError, match="has two experts split at boundary_ratio=0.72: choose which to train with "
                                         "model.expert=high"):
        build("wan", str(experts))
    with pytest.raises(ValueError, match="model.expert=low but model.pretrained_path=.* is not a pipeline with two experts"):
        build("wan", str(made["wan"]["pipeline"]), "low")


@pytest.mark.timeout(600)
def test_both_experts_match_one_process_under_ulysses_2_x_dp_2(experts: Path, made: dict[str, Any]) -> None:
    cache = str(made["wan"]["cache"])
    results = run_distributed(cache_fit, 4, "wan", str(experts), cache, {"ulysses_degree": 2}, None, None, "both",
                              init_process_group=False, timeout=400)
    reference = one_process("wan", str(experts), cache, 2, "both")
    check_against_one_process(results, reference, "wan, both experts, ulysses 2 x dp 2", TOLERANCE["wan"])
    for expert in ("transformer.", "transformer_2."):  # the draws give each expert samples: both train
        moved = [name for name, after in reference["after"].items()
                 if name.startswith(expert) and not torch.equal(after, reference["before"][name])]
        assert moved, f"no adapter of {expert} moved: the comparison says nothing about that expert"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["flux", "cogvideox"])
def test_lora_resumes_exactly_from_a_mid_run_checkpoint_holding_only_the_adapters(made: dict[str, Any],
                                                                                  tmp_path: Path, family: str) -> None:
    """Flow matching's draws (Flux) and CogVideoX's own (integer DDPM timesteps, v-prediction) continue where the
    checkpoint left them. ``python -m benchmarks.families --parts resume`` checks every family."""
    case = made[family]
    args = (family, str(case["pipeline"]), str(case["cache"]), {"ring_degree": 2})
    straight = run_distributed(cache_fit, 2, *args, str(tmp_path), init_process_group=False, timeout=400)
    checkpoint = tmp_path / "step=1.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    frozen = [k for k in saved["state_dict"] if "lora_" not in k and k != "draws"]
    assert not frozen, f"the frozen base is in the checkpoint: {frozen[:3]}"
    resumed = run_distributed(cache_fit, 2, *args, None, str(checkpoint), init_process_group=False, timeout=400)
    for rank, (whole, second) in enumerate(zip(straight, resumed)):
        assert second["losses"] == whole["losses"][1:], f"rank {rank}: losses after resuming"
        for name, weight in whole["after"].items():
            assert torch.equal(second["after"][name], weight), f"rank {rank}: {name} after resuming"


@pytest.mark.timeout(600)
# One family per kind of validation call and adapter loader, under each layout: text-to-image (Flux), edit (Flux
# Kontext), image-to-video (Wan), a transformer-level loader (HunyuanVideo 1.5); Wan also through the two-expert test
# below. python -m benchmarks.families runs this round trip for every family (its table, in the README, is checked
# against its results by test_docs), QwenImage's masked text and unused parameters among them.
@pytest.mark.parametrize(("family", "layout"), [("flux", "parallel.ring_degree=2"),
                                                ("flux_kontext", "parallel=ulysses"),
                                                ("wan_i2v", "parallel.ring_degree=2"),
                                                ("hunyuanvideo15_i2v", "parallel.ring_degree=2")])
def test_train_py_logs_pipeline_samples_and_saves_adapters_the_pipeline_loads(made: dict[str, Any], tmp_path: Path,
                                                                              family: str, layout: str) -> None:
    facts = train_py_round_trip(family, made[family], tmp_path, layout)
    assert not round_trip_problems(facts, find_family(family).video), facts


def train_py_round_trip(family: str, case: dict[str, Any], folder: Path, layout: str) -> dict[str, Any]:
    """``train.py`` from ``case``'s cache under ``layout`` for 3 steps with validation samples every 2, then the
    pipeline with and without the run's adapters (loaded with the family's loader) generating the same sample: what
    the run logged and how far apart the generations are (pixel levels, 0-255)."""
    from test_train_cli import wandb_run

    from recipe.samples import open_images

    run, chosen = folder / "run", find_family(family)
    video = chosen.video
    size = ["validation.height=64", "validation.width=64"] if not video else \
        ["validation.height=32", "validation.width=32", "validation.frames=5"]
    reference = folder / "start.png"  # edit and image-to-video: the image the prompt starts from
    read_frames(case["media"] / case["files"]["good"][0])[0].save(reference)
    images: Any = str(reference)  # a family that edits with several images gets two: the sample's and its reference's
    if chosen.starts_from_image and chosen.max_references != 1:
        second = folder / "second.png"
        read_frames(case["media"] / f"{Path(case['files']['good'][0]).stem}.ref.png")[0].save(second)
        images = [str(reference), str(second)]
    if chosen.starts_from_image:
        size.append(f"validation.references=[{images if isinstance(images, str) else '[' + ','.join(images) + ']'}]")
    command = [sys.executable, str(ROOT / "train.py"), f"model={family}", f"model.pretrained_path={case['pipeline']}",
               "model.dtype=float32", "data=latents", f"data.cache={case['cache']}", "lora.rank=4", "lora.alpha=8",
               layout, "trainer.max_steps=3", "optimizer.lr=1e-2", "optimizer.warmup_steps=1",
               "sample_every_n_steps=2", "sample_steps=2", *size, "validation.prompts=[a red cat]", "timeout_s=60",
               "trainer.log_every_n_steps=1", f"hydra.run.dir={run}"]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=400)
    if result.returncode:
        return {"failed": result.stdout[-3000:] + result.stderr[-3000:]}
    _, history = wandb_run(run)
    facts: dict[str, Any] = {
        "logged": [(row["trainer/global_step"], row["samples/_type"]) for row in history if "samples/_type" in row],
        "loss_logged": any("train/loss" in row for row in history)}
    pipeline = family_pipeline(family).from_pretrained(case["pipeline"])
    options = {"height": 64, "width": 64} if not video else {"height": 32, "width": 32, "num_frames": 5}
    if chosen.starts_from_image:
        options.update(chosen.image_inputs(pipeline, open_images(images), options["height"], options["width"]))
    takes = inspect.signature(type(pipeline).__call__).parameters  # as the run's samples: what the pipeline takes
    options = {name: value for name, value in options.items() if name in takes}

    def generate() -> np.ndarray:
        out = pipeline(**chosen.prompt_inputs(pipeline, ["a red cat"]), num_inference_steps=2,
                       generator=torch.Generator().manual_seed(0), output_type="pil", **options)
        return np.asarray(out.images[0] if not video else out.frames[0][0], dtype=np.int16)

    base = generate()
    chosen.load_lora(pipeline, run / "lora")
    tuned = generate()
    facts["tuned_vs_base"] = int(np.abs(tuned - base).max())
    if not video:  # the run's last sample is a PNG of the same generation
        sample = np.asarray(Image.open(run / "samples" / "step000003-0.png"), dtype=np.int16)
        facts["tuned_vs_sample"] = int(np.abs(tuned - sample).max())
    else:  # a GIF's palette is lossy: its existence is checked, and that the adapters change the generation
        facts["sample_written"] = (run / "samples" / "step000003-0.gif").is_file()
    return facts


def round_trip_problems(facts: dict[str, Any], video: bool) -> list[str]:
    """What in a ``train_py_round_trip`` is not what the pipeline does (nothing, when it is)."""
    if "failed" in facts:
        return [f"train.py failed: {facts['failed']}"]
    kind = "images/separated" if not video else "videos"
    problems = []
    if facts["logged"] != [(2, kind), (3, kind)]:  # every 2 steps and at the end, next to the loss
        problems.append(f"samples logged at {facts['logged']}, not at steps 2 and 3")
    if not facts["loss_logged"]:
        problems.append("no train/loss in the W&B run")
    if facts["tuned_vs_base"] <= 2:
        problems.append("the reloaded adapters change nothing: the check cannot fail")
    if not video and facts["tuned_vs_sample"] > 1:
        problems.append("the reloaded adapters generate another image than the run's sample")
    if video and not facts["sample_written"]:
        problems.append("no video sample written at step 3")
    return problems


def test_validation_images_are_one_per_prompt_for_edit_and_i2v_families_and_refused_for_others(tmp_path: Path) -> None:
    from recipe.samples import PipelineSamples, ValidationConfig

    kontext, flux = ModelConfig(family="flux_kontext"), ModelConfig(family="flux")
    with pytest.raises(ValueError, match=r"validation.references has 0 images for 2 validation.prompts: "
                                         r"model.family=flux_kontext \(edit\) starts from an image"):
        PipelineSamples(2, kontext, ValidationConfig(prompts=["a", "b"]), 2, tmp_path)
    PipelineSamples(2, kontext, ValidationConfig(prompts=["a"], references=["ref.png"]), 2, tmp_path)
    with pytest.raises(ValueError, match=r"validation.references is set but model.family=flux \(text-to-image\) takes no"):
        PipelineSamples(2, flux, ValidationConfig(references=["ref.png"]), 2, tmp_path)
    PipelineSamples(2, flux, ValidationConfig(guidance_scale=3.5), 2, tmp_path)
    PipelineSamples(2, ModelConfig(family="qwenimage_edit_plus"),  # several images for one prompt
                    ValidationConfig(prompts=["a"], references=[["a.png", "b.png"]]), 2, tmp_path)
    with pytest.raises(ValueError, match=r"validation.references has 2 images for one prompt \(\['a.png', 'b.png'\]\) "
                                         r"but model.family=flux_kontext edits with 1"):
        PipelineSamples(2, kontext, ValidationConfig(prompts=["a"], references=[["a.png", "b.png"]]), 2, tmp_path)
    with pytest.raises(ValueError, match=r"validation.guidance_scale is set but HunyuanVideo15Pipeline takes none"):
        PipelineSamples(2, ModelConfig(family="hunyuanvideo15"), ValidationConfig(guidance_scale=3.5), 2, tmp_path)


@pytest.mark.timeout(600)
def test_train_py_saves_each_experts_adapters_where_the_pipeline_loads_them(experts: Path, made: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "model=wan", f"model.pretrained_path={experts}",
               "model.expert=both", "model.dtype=float32", "data=latents", f"data.cache={made['wan']['cache']}",
               "lora.rank=4", "lora.alpha=8", "parallel=ulysses", "trainer.max_steps=3", "optimizer.lr=1e-2",
               "optimizer.warmup_steps=1", "sample_every_n_steps=0", "sample_steps=2", "validation.height=32",
               "validation.width=32", "validation.frames=5", "validation.prompts=[a red cat]", "timeout_s=60",
               f"hydra.run.dir={run}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run / "samples" / "step000003-0.gif").is_file()
    pipeline = family_pipeline("wan").from_pretrained(experts)

    def generate() -> np.ndarray:
        out = pipeline("a red cat", height=32, width=32, num_frames=5, num_inference_steps=4, output_type="np",
                       generator=torch.Generator().manual_seed(0))
        return out.frames[0]

    base = generate()
    pipeline.load_lora_weights(run / "lora")  # the high-noise expert's: transformer
    high = generate()
    pipeline.load_lora_weights(run / "lora_2", load_into_transformer_2=True)  # the low-noise expert's
    both = generate()
    assert np.abs(high - base).max() > 1e-3, "the high-noise expert's adapters change nothing"
    assert np.abs(both - high).max() > 1e-3, "the low-noise expert's adapters change nothing"


def test_a_transformer_folder_trains_and_skips_samples_with_a_warning(made: dict[str, Any], tmp_path: Path) -> None:
    from recipe.samples import PipelineSamples, ValidationConfig

    folder = str(made["flux"]["pipeline"] / "transformer")
    module = FlowMatching(ModelConfig(family="flux", pretrained_path=folder), OPTIMIZERS["adamw"], 0, LORA)  # it trains
    with pytest.warns(UserWarning, match="is a transformer folder: with no pipeline to generate with, no validation"):
        samples = PipelineSamples(2, ModelConfig(family="flux", pretrained_path=folder), ValidationConfig(), 2, tmp_path)
    samples.generate(None, module)  # type: ignore[arg-type]  # what the end of training calls: nothing, no error
    assert not (tmp_path / "samples").exists()


@pytest.mark.timeout(300)
def test_the_accelerate_example_trains_lora_from_the_cache(made: dict[str, Any], tmp_path: Path) -> None:
    case = made["flux"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "examples" / "train_accelerate.py"), "model=flux", f"model.pretrained_path={case['pipeline']}",
               "model.dtype=float32", "data=latents", f"data.cache={case['cache']}", "lora.rank=4", "parallel=ring",
               "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trainable, total = (int(n) for n in result.stdout.split("trainable parameters: ")[1].split()[:3:2])
    assert 0 < trainable < total / 10, "lora.rank=4 on the pretrained model: only the adapters train"
    assert "step 2 loss" in result.stdout


def family_pipeline(family: str) -> Any:
    return find_family(family).pipeline_class()


@pytest.mark.timeout(120)
def test_bfloat16_base_keeps_float32_adapters_and_checkpointing_is_a_setting(made: dict[str, Any]) -> None:
    case = made["flux"]
    model = ModelConfig(family="flux", pretrained_path=str(case["pipeline"]), dtype="bfloat16", gradient_checkpointing=True)
    module = FlowMatching(model, OPTIMIZERS["adamw"], 0, LORA)
    dtypes = {(weight.requires_grad, weight.dtype) for weight in module.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}, dtypes
    assert module.transformer.gradient_checkpointing
    module(BucketBatches(LatentCache(case["cache"]), 2)[0]).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in module.parameters() if w.requires_grad)
