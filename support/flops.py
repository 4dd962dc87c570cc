# Throughput as nanoGPT reports it: model FLOPs utilisation (MFU) = FLOPs the algorithm needs / time / a
# MEASURED matmul peak of this device (a datasheet peak flatters nobody). FLOPs are counted by torch's
# FlopCounterMode (matmuls, convolutions and attention, forward and backward) on one object: a CFG policy
# forward, a training micro-step (forward + backward through the frozen UNet to the LoRA weights), and the
# reward (VAE decode, LGM, renderer, LPIPS). Support code for train.py and bench/epoch.py.
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from support.compiling import compile_seconds
from support.devices import sync


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_flops(policy, reward_fn, device, guidance_scale):
    """FLOPs per object (4 views) of: one CFG policy forward, one training micro-step, the reward."""
    C, h, w = policy.latent_shape
    x = torch.randn(1, policy.num_views, C, h, w, device=device, generator=torch.Generator(device).manual_seed(0))
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    emb = policy.negative_embeds.to(device)
    with torch.no_grad():
        forward = _counted(lambda: policy(x, t, emb, guidance_scale))
        reward = _counted(lambda: reward_fn(policy.decode(x)))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    train = _counted(lambda: policy(x, t, emb, guidance_scale).float().square().mean().backward()) if trainable else 0
    for p in trainable:
        p.grad = None
    return {"forward": forward, "train_step": train, "reward": reward}


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
    """Per epoch: wall time of sampling (+ reward), of the update and of compiling within them, samples/s, TFLOP/s
    and MFU over the whole epoch (sampling, reference, reward, update), peak GPU memory."""

    def __init__(self, policy, reward_fn, device, cfg, plan, world):
        self.cfg, self.plan, self.world, self.device = cfg, plan, world, device
        self.flops = count_flops(policy, reward_fn, device, cfg.guidance_scale)
        amp = device.type == "cuda" and cfg.mixed_precision == "bf16"
        self.peak = measure_peak_flops(device, torch.bfloat16 if amp else torch.float32)
        self.compiled_s = compile_seconds()

    def describe(self):
        f = self.flops
        return (f"per object: CFG policy forward {f['forward'] / 1e9:.1f} GFLOP, training micro-step "
                f"{f['train_step'] / 1e9:.1f} GFLOP, reward {f['reward'] / 1e9:.1f} GFLOP; measured matmul peak "
                f"{self.peak / 1e12:.2f} TFLOP/s per device")

    def epoch_flops(self, epoch):
        n, f, cfg = self.plan.samples_per_epoch, self.flops, self.cfg
        sampling = n * (cfg.num_steps * f["forward"] * (2 if cfg.kl_penalty else 1) + f["reward"])
        training = 0 if epoch == 0 else (n * self.plan.num_train_timesteps * f["train_step"]
                                         * self.plan.num_inner_epochs)
        return sampling + training

    def start_epoch(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        self.times, self.t = {}, time.perf_counter()

    def mark(self, stage):
        sync(self.device)
        now = time.perf_counter()
        self.times[stage], self.t = now - self.t, now

    def end_epoch(self, epoch):
        dt = sum(self.times.values())
        achieved = self.epoch_flops(epoch) / dt / self.world
        out = {f"t_{k}": v for k, v in self.times.items()}
        # the compile warm-up: seconds of this epoch spent compiling (epoch 0: sampling, reference and reward graphs;
        # epoch 1: the update's; then 0 unless something recompiles; tell by TORCH_LOGS=recompiles)
        done = compile_seconds()
        out["t_compile"], self.compiled_s = done - self.compiled_s, done
        out.update(samples_per_s=self.plan.samples_per_epoch / dt, tflops_per_device=achieved / 1e12,
                   mfu=achieved / self.peak)
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return out
