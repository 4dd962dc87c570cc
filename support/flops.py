# Throughput as nanoGPT reports it: model FLOPs utilisation (MFU) = FLOPs the algorithm needs / time / a
# MEASURED matmul peak of this device (a datasheet peak flatters nobody). FLOPs are counted by torch's
# FlopCounterMode on one CFG policy forward (conv/linear/attention as 2 x MACs). Support code for train.py.
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from support.devices import sync


def count_forward_flops(policy, device, guidance_scale):
    """FLOPs of one CFG policy forward for one object (4 views), counted by torch's FlopCounterMode."""
    C, h, w = policy.latent_shape
    x = torch.zeros(1, policy.num_views, C, h, w, device=device)
    emb = policy.negative_embeds.to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy(x, torch.full((1,), 500, device=device, dtype=torch.long), emb, guidance_scale)
    return counter.get_total_flops()


def measure_peak_flops(device, dtype):
    """Measured matmul throughput: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024  # 4096^3 does not reach the H100/H200 bf16 peak
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: checkpoints save its state
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class Throughput:
    """Samples/s and MFU of one epoch. The LoRA backward costs about one forward: it needs the input gradients
    through every frozen layer (dX = dY W^T) but weight gradients only for the tiny adapters."""

    def __init__(self, policy, device, cfg, plan, world, amp):
        self.cfg, self.plan, self.world = cfg, plan, world
        self.flops_fwd = count_forward_flops(policy, device, cfg.guidance_scale)
        self.peak = measure_peak_flops(device, torch.bfloat16 if amp else torch.float32)

    def describe(self):
        return (f"policy forward (1 object, CFG): {self.flops_fwd / 1e9:.1f} GFLOP; measured matmul peak "
                f"{self.peak / 1e12:.2f} TFLOP/s per device")

    def __call__(self, epoch, t_sample, t_train, with_reference):
        n_samples = self.plan.samples_per_epoch
        fwd_sampling = n_samples * self.cfg.num_steps * (2 if with_reference else 1)
        fwd_training = 0 if epoch == 0 else n_samples * self.plan.num_train_timesteps * 2 * self.cfg.num_inner_epochs
        dt = t_sample + t_train
        achieved = (fwd_sampling + fwd_training) * self.flops_fwd / dt / self.world
        return {"samples_per_s": n_samples / dt, "t_sample": t_sample, "t_train": t_train,
                "tflops_per_device": achieved / 1e12, "mfu": achieved / self.peak}
