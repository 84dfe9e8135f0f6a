"""Train a DiT with context parallelism: ``python train.py [group=option] [key=value ...]``.

Compose the config (``conf/``), build the recipe (data: the demo's photo crops, or with ``data=latents``
a cache ``prepare.py`` made; the flow-matching module and callbacks from ``recipe/``; the logger), and fit with ``ContextParallelStrategy``. Lightning starts one process per
device (or joins the processes ``torchrun`` started).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy
from recipe.cache import BucketBatches
from recipe.callbacks import LoraExport, LossCurve, SampleGrid, TrainingMonitor
from recipe.config import (
    in_multirun,
    register_configs,
    resolve_checkpoint,
    run_sweep_job_as_single_run,
)
from recipe.data import PhotoCrops
from recipe.flow_matching import FlowMatching
from recipe.latents import LatentsConfig, latent_cache
from recipe.samples import PipelineSamples, ValidationConfig

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if in_multirun():
        return run_sweep_job_as_single_run()
    parallel = OmegaConf.to_object(cfg.parallel)
    parallel.resolve(cfg.trainer.devices * cfg.trainer.num_nodes)  # fail fast, before any process starts
    L.seed_everything(cfg.seed, verbose=False)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = resolve_checkpoint(cfg.resume, Path(get_original_cwd()) / "outputs", out_dir)

    data = OmegaConf.to_object(cfg.data)
    lora = OmegaConf.to_container(cfg.lora)
    model, optimizer = OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.optimizer)
    if isinstance(data, LatentsConfig):  # your data, cached by prepare.py, on a pretrained model
        dataset = BucketBatches(latent_cache(data, model), data.batch_size, data.seed)
        module = FlowMatching(model, optimizer, 0, lora, cfg.seed)
        module.check_data(dataset.cache[0])
        latent_shape = dataset.cache.shape(0)
        samples = PipelineSamples(cfg.sample_every_n_steps, model, ValidationConfig(**cfg.validation), cfg.sample_steps,
                                  out_dir)
        loader = DataLoader(dataset, batch_size=None, shuffle=True, num_workers=data.num_workers)
    else:  # the demo: photo crops, class-conditioned
        dataset = PhotoCrops(data)
        module = FlowMatching(model, optimizer, dataset.num_classes, lora, cfg.seed)
        latent_shape = tuple(dataset[0]["latents"].shape)
        samples = SampleGrid(cfg.sample_every_n_steps, dataset.examples(), cfg.sample_steps, out_dir)
        loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers)

    logger = instantiate(cfg.logger)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    extra = [instantiate(callback) for callback in cfg.callbacks]
    trainer = L.Trainer(
        **cfg.trainer,
        strategy=ContextParallelStrategy(parallel, timeout=timedelta(seconds=cfg.timeout_s), **module.ddp_options()),
        logger=logger,
        callbacks=[
            TrainingMonitor(module.sequence_length(latent_shape), out_dir),
            samples,
            LossCurve(out_dir),
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(out_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True),
            *([LoraExport(module.family.name, out_dir)] if lora["rank"] else []),
            *extra,
            # Lightning's rich bar prints "Epoch 1/-2" for a run bounded by max_steps; tqdm's counts steps.
            *([] if any(isinstance(c, ProgressBar) for c in extra) else [TQDMProgressBar()]),
        ],
    )
    trainer.fit(module, loader, ckpt_path=checkpoint)


if __name__ == "__main__":
    main()
