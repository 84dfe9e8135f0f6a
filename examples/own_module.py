"""Your own LightningModule under context parallelism: the module written for one process, unchanged.

    python examples/own_module.py     # ring attention over 2 processes on this CPU
    python examples/own_module.py 1   # the same training on one process, to compare with

What the strategy needs of a module: the diffusers model is an attribute (here ``self.transformer``),
noise comes from torch's RNG (the strategy seeds it alike on the ranks that share a sample), and the
Trainer keeps its distributed sampler (``use_distributed_sampler``, on by default).
"""

import sys

import lightning as L
import torch
from diffusers import FluxTransformer2DModel
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy

SIDE, TEXT = 16, 8  # a 16 x 16 latent grid: 256 image tokens, and 8 text tokens


class Denoiser(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
        self.register_buffer("img_ids", torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        latents, text = batch["latents"], batch["text"]  # (B, 256, 16) and (B, 8, 32): whole sequences
        noise, t = torch.randn_like(latents), torch.rand(len(latents), device=self.device)
        x_t = (1 - t[:, None, None]) * latents + t[:, None, None] * noise  # flow matching
        velocity = self.transformer(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=text.mean(1),
                                    timestep=t, img_ids=self.img_ids, txt_ids=torch.zeros(TEXT, 3)).sample
        loss = torch.nn.functional.mse_loss(velocity, noise - latents)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    processes = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    L.seed_everything(0)  # the same weights, and the same noise on the ranks of a sequence
    g = torch.Generator().manual_seed(0)
    data = [{"latents": torch.randn(SIDE * SIDE, 16, generator=g), "text": torch.randn(TEXT, 32, generator=g)}
            for _ in range(8)]
    trainer = L.Trainer(strategy=ContextParallelStrategy(ring_degree=processes), accelerator="cpu", devices=processes,
                        max_epochs=1, logger=False, enable_checkpointing=False)
    module = Denoiser()
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, DataLoader(data, batch_size=2))
    if trainer.is_global_zero:
        update = sum(float((p.detach() - b).double().square().sum()) for p, b in zip(module.parameters(), before))
        print(f"trained {trainer.global_step} steps, loss {float(trainer.callback_metrics['loss']):.8e}, "
              f"update norm {update**0.5:.8e}")
