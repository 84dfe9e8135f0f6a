"""Your own Accelerate loop, written for one process, under ring attention.

    torchrun --nproc-per-node 2 examples/own_loop.py   # 2 processes on this CPU (accelerate launch on GPUs)
    python examples/own_loop.py                        # one process, to compare with
"""
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import WanTransformer3DModel

from cp_plugin import ParallelConfig
from cp_plugin.accelerate import ContextParallelPlugin

accelerator = Accelerator(cpu=not torch.cuda.is_available())
set_seed(0)  # the same weights, data and noise on every rank
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              out_channels=4, text_dim=16, ffn_dim=32, num_layers=2)
before = torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # a copy
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
loader = torch.utils.data.DataLoader([(torch.randn(4, 2, 16, 16), torch.randn(8, 16)) for _ in range(8)], batch_size=2)
cp = ContextParallelPlugin(ParallelConfig(ring_degree=accelerator.num_processes))
model, optimizer, loader = cp.prepare(accelerator, model, optimizer, loader)  # instead of accelerator.prepare
for step, (latents, text) in enumerate(loader, 1):  # whole sequences: video latents and prompt embeddings
    noise, t = torch.randn_like(latents), torch.rand(len(latents), device=latents.device)
    x_t = torch.lerp(latents, noise, t.view(-1, 1, 1, 1, 1))  # flow matching
    velocity = model(x_t, timestep=1000 * t, encoder_hidden_states=text).sample
    loss = torch.nn.functional.mse_loss(velocity, noise - latents)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
update = torch.nn.utils.parameters_to_vector(accelerator.unwrap_model(model).parameters()).detach() - before
accelerator.print(f"trained {step} steps, loss {loss.item():.8e}, update norm {float(update.norm()):.8e}")
