"""Your own LightningModule, written for one process, under ring attention: `python examples/own_module.py [processes]`.

The strategy needs the diffusers model as an attribute, noise from torch's RNG and the Trainer's distributed sampler.
"""
import sys

import lightning as L
import torch
from diffusers import WanTransformer3DModel

from cp_plugin import ContextParallelStrategy


class Denoiser(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                 in_channels=4, out_channels=4, text_dim=16, ffn_dim=32, num_layers=2)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        latents, text = batch  # whole sequences: (B, 4, 2, 16, 16) video latents, (B, 8, 16) prompt embeddings
        noise, t = torch.randn_like(latents), torch.rand(len(latents))
        x_t = torch.lerp(latents, noise, t.view(-1, 1, 1, 1, 1))  # flow matching
        velocity = self.transformer(x_t, timestep=1000 * t, encoder_hidden_states=text).sample
        self.log("loss", loss := torch.nn.functional.mse_loss(velocity, noise - latents))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


if __name__ == "__main__":
    processes = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    L.seed_everything(0)  # the same weights, data and noise on every rank
    data = [(torch.randn(4, 2, 16, 16), torch.randn(8, 16)) for _ in range(8)]
    module = Denoiser()
    before = torch.nn.utils.parameters_to_vector(module.parameters()).detach()  # a copy
    trainer = L.Trainer(strategy=ContextParallelStrategy(ring_degree=processes), accelerator="cpu", devices=processes,
                        max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    update = torch.nn.utils.parameters_to_vector(module.parameters()).detach() - before
    if trainer.is_global_zero:
        print(f"trained {trainer.global_step} steps, loss {float(trainer.callback_metrics['loss']):.8e}, "
              f"update norm {float(update.norm()):.8e}")
