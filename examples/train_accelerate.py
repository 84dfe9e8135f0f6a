"""Train the same DiT with an Accelerate loop instead of Lightning: same ``conf/``, data and model code.

    torchrun --nproc-per-node 4 examples/train_accelerate.py parallel.ring_degree=2 parallel.ulysses_degree=2  # CPU
    accelerate launch --num_processes 8 examples/train_accelerate.py parallel.ring_degree=4                    # GPUs

The loop is the one written for one process; ``cp.prepare`` replaces ``accelerator.prepare``. It takes
train.py's model, data (the photos, or ``data=latents`` with a cache ``prepare.py`` made), ``lora.*``,
optimizer and parallel settings; ``resume`` it refuses (``accelerator.load_state`` in your own loop,
or train.py, resume a run).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: recipe/ and fixtures/ are not installed

from cp_plugin.accelerate import ContextParallelPlugin  # noqa: E402
from recipe.cache import BucketBatches  # noqa: E402
from recipe.config import register_configs  # noqa: E402
from recipe.data import PhotoCrops  # noqa: E402
from recipe.flow_matching import FlowMatching  # noqa: E402
from recipe.latents import LatentsConfig, latent_cache  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    if cfg.resume is not None:
        raise ValueError(f"resume={cfg.resume} is not supported by this example; resume with train.py, or call "
                         "accelerator.load_state(<checkpoints/step_N>) in your own loop")
    use_wandb = "Wandb" in cfg.logger._target_
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.trainer.accumulate_grad_batches,
        mixed_precision="bf16" if "bf16" in str(cfg.trainer.precision) else "no",
        log_with="wandb" if use_wandb else None,
    )
    set_seed(cfg.seed)
    out_dir = Path(broadcast_object_list([HydraConfig.get().runtime.output_dir])[0])  # rank 0's run directory

    data, model_config = OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.model)
    optimizer_config, lora = OmegaConf.to_object(cfg.optimizer), OmegaConf.to_container(cfg.lora)
    if isinstance(data, LatentsConfig):  # your data, cached by prepare.py: batches of one bucket each
        cached = BucketBatches(latent_cache(data, model_config), data.batch_size, data.seed)
        module = FlowMatching(model_config, optimizer_config, 0, lora, cfg.seed)
        module.check_data(cached.cache[0])
        loader = DataLoader(cached, batch_size=None, shuffle=True, num_workers=data.num_workers)
    else:  # the demo: photo crops, class-conditioned
        dataset = PhotoCrops(data)
        module = FlowMatching(model_config, optimizer_config, dataset.num_classes, lora, cfg.seed)
        loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=True, num_workers=data.num_workers)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    accelerator.print(f"trainable parameters: {trainable} of {sum(p.numel() for p in module.parameters())}")
    schedule = module.configure_optimizers()
    cp = ContextParallelPlugin(OmegaConf.to_object(cfg.parallel))
    model, optimizer, loader, scheduler = cp.prepare(
        accelerator, module, schedule["optimizer"], loader, schedule["lr_scheduler"]["scheduler"]
    )
    if use_wandb:
        wandb = {"mode": "offline" if cfg.logger.offline else "online", "dir": str(out_dir)}
        accelerator.init_trackers(cfg.logger.project, OmegaConf.to_container(cfg, resolve=True), {"wandb": wandb})

    step = 0
    while step < cfg.trainer.max_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.trainer.gradient_clip_val:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            mean_loss = accelerator.gather_for_metrics(loss.detach()).mean().item()
            accelerator.log({"train/loss": mean_loss, "lr": scheduler.get_last_lr()[0]}, step=step)
            accelerator.print(f"step {step} loss {mean_loss:.6e}")
            if step % cfg.checkpoint_every_n_steps == 0:
                accelerator.save_state(str(out_dir / "checkpoints" / f"step_{step}"))
            if step >= cfg.trainer.max_steps:
                break
    accelerator.end_training()


if __name__ == "__main__":
    main()
