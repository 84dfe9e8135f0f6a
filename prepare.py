"""Encode a folder of captioned images or videos into a latent cache, with the pipeline's own VAE and text encoders.

``python prepare.py model=<family> model.pretrained_path=<pipeline folder> data.path=<media folder> data.cache=<cache>``
(``torchrun --nproc-per-node <n> prepare.py ...`` spreads the files over ranks). Run it again and it
encodes only what is missing. Then ``python train.py model=<family> ... data=latents data.cache=<cache>``
trains from the cache. See ``recipe/latents.py``.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from recipe.config import register_configs
from recipe.latents import encode_folder

register_configs()
log = logging.getLogger("prepare")


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    done = encode_folder(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.data), rank, world_size)
    log.info("rank %d/%d: cached %d files, %d were already cached, skipped %d (reasons above)", rank, world_size,
             done["cached"], done["present"], len(done["skipped"]))


if __name__ == "__main__":
    main()
