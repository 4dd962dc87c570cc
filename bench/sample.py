# bench/sample.py: cost of sampling DDPO trajectories with the MVDream policy (sample.py).
#
#   python bench/sample.py --device cuda   # paper setup, random weights: full-size MVDream, 4 x 256 px views
#                                          # (4x32x32 latents), LoRA r=4, bf16 autocast, 50 DDIM steps, CFG;
#                                          # 1 / 8 / 32 prompts per batch, with and without reference log-probs
#   python bench/sample.py --device cpu    # toy setup: tiny MVDream, 8 prompts, 20 steps (target <= 10 s with ref)
#   options: --quick (smoke run), --compile MODE, --channels-last, --sdpa BACKEND, --weights bf16|fp32,
#            --batches 1,8,32, --steps N, --no-lora
#
# Reports seconds per prompt for the whole trajectory (text encoding, T CFG UNet calls (x2 with reference),
# DDIM steps, VAE/pixel decode), the UNet forward alone, achieved TFLOP/s and its fraction of the MEASURED
# matmul peak (bf16 8192^3 on CUDA). FLOPs: torch.utils.flop_counter.FlopCounterMode on one forward and one
# decode (conv/linear/attention as 2*MAC; norms and pointwise ops are not counted).
# Random weights: the cost of these networks does not depend on the weight values.
import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's sample.py, not this file

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mvdream import MVDreamPolicy  # noqa: E402
from sample import sample_trajectories  # noqa: E402

WORDS = ["a", "red", "yellow", "green", "blue", "purple", "cube", "ball", "cone", "cylinder"]


def prompts(n):
    colors, shapes = WORDS[1:6], WORDS[6:]
    return [f"a {colors[i % 5]} {shapes[(i // 5) % 4]}" for i in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def matmul_peak(device, quick):
    # The MFU denominator is measured, not a datasheet number.
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = (5 if quick else 20) if device.type == "cuda" else 3
    c = torch.empty_like(a)
    sec, _ = timed(lambda: [torch.matmul(a, b, out=c) for _ in range(reps)], device, repeats=3, warmup=1)
    return 2 * n**3 * reps / sec, f"{n}^3 {str(dtype).removeprefix('torch.')} matmul"


def rate_str(flops_per_s, device):
    return f"{flops_per_s / 1e12:.2f}" if device.type == "cuda" else f"{flops_per_s / 1e9:.1f}"


def count_flops(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer batches/steps/repeats")
    ap.add_argument("--compile", default="none", help="torch.compile mode for the UNet: none|default|max-autotune|...")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights and activations in channels_last")
    ap.add_argument("--sdpa", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"])
    ap.add_argument("--weights", default="bf16", choices=["bf16", "fp32"], help="frozen base weights dtype (CUDA)")
    ap.add_argument("--batches", default=None, help="prompts per batch, e.g. 1,8,32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-lora", action="store_true", help="no adapters (the reference pass is then the same UNet)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
        policy = MVDreamPolicy.random_init("sd21-4view", device=device, dtype=dtype)
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        batches = [1, 8] if args.quick else [1, 8, 32]
        steps = 10 if args.quick else 50
        what = "full-size MVDream (random weights), 4 views x 256 px"
    else:
        policy = MVDreamPolicy.tiny(WORDS, seed=0)
        autocast = contextlib.nullcontext
        batches, steps = [8], 20
        what = f"tiny MVDream, 4 views x 64 px, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}"
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    steps = args.steps or steps
    if not args.no_lora:
        policy.add_lora(4, 4)
    policy.eval()
    if args.channels_last:
        policy.unet.to(memory_format=torch.channels_last)
    sdpa = contextlib.nullcontext  # a factory: sdpa_kernel's context manager is single-use
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.sdpa]
        sdpa = lambda: sdpa_kernel(backend)  # noqa: E731
    guidance = 7.5

    peak, peak_what = matmul_peak(device, args.quick)
    C, h, w = policy.latent_shape
    x1 = torch.randn(1, 4, C, h, w, device=device)
    t1 = torch.full((1,), 500, device=device)
    e1 = policy.encode_prompts(prompts(1))
    with autocast(), sdpa():
        fwd_flops = count_flops(lambda: policy(x1, t1, e1, guidance))  # one prompt, CFG (2 x 4 views)
        dec_flops = count_flops(lambda: policy.decode(x1))
    if args.compile != "none":  # after counting: FlopCounterMode needs the eager ops
        policy.unet.compile(mode=None if args.compile == "default" else args.compile)
    unit = "TFLOP/s" if cuda else "GFLOP/s"
    n_params = sum(p.numel() for p in policy.unet.parameters() if not p.requires_grad)
    print(f"{what}; {device} {torch.cuda.get_device_name(device) if cuda else ''}")
    print(f"UNet {n_params / 1e6:.1f} M frozen params; CFG forward per prompt (8 images): {fwd_flops / 1e9:.1f} GFLOP; "
          f"decode per prompt: {dec_flops / 1e9:.1f} GFLOP; "
          f"measured peak ({peak_what}): {rate_str(peak, device)} {unit}")
    print(f"options: compile={args.compile} channels_last={args.channels_last} sdpa={args.sdpa} "
          f"weights={args.weights if cuda else 'fp32'} lora={not args.no_lora} steps={steps} guidance={guidance}")

    print("\nPolicy CFG forward = one UNet call on 2 x 4 images per prompt (no grad)")
    print(f"{'prompts':>8} {'images':>7} {'adapters':>9} {'ms':>9} {unit:>8} {'of peak':>8} {'peak GiB':>9}")
    for B in batches:
        x = torch.randn(B, 4, C, h, w, device=device)
        t = torch.full((B,), 500, device=device)
        e = policy.encode_prompts(prompts(B))
        for adapters in ((True, False) if not args.no_lora else (False,)):
            def fwd():
                with torch.no_grad(), autocast(), sdpa(), (contextlib.nullcontext() if adapters
                                                         else policy.disable_adapters()):
                    policy(x, t, e, guidance)
            sec, mem = timed(fwd, device, repeats=3 if args.quick else 10, warmup=2)
            rate = B * fwd_flops / sec
            print(f"{B:>8} {B * 8:>7} {'on' if adapters else 'off':>9} {sec * 1e3:>9.1f} {rate_str(rate, device):>8} "
                  f"{rate / peak:>8.1%} {mem:>9.2f}")

    print(f"\nWhole trajectory: {steps} steps, CFG, decode (sample_trajectories)")
    print(f"{'prompts':>8} {'ref':>4} {'s total':>8} {'s/prompt':>9} {unit:>8} {'of peak':>8} {'peak GiB':>9}")
    for B in batches:
        for ref in (False, True):
            g = torch.Generator(device).manual_seed(0)

            def run(n):
                with autocast(), sdpa():
                    sample_trajectories(policy, prompts(B), num_steps=n, guidance_scale=guidance, generator=g,
                                        with_reference=ref)
            run(2)  # warm-up (and compilation) at the same shapes
            sec, mem = timed(lambda: run(steps), device, repeats=1, warmup=0)  # one long run is enough
            flops = B * (steps * fwd_flops * (2 if ref else 1) + dec_flops)
            print(f"{B:>8} {'yes' if ref else 'no':>4} {sec:>8.2f} {sec / B:>9.3f} {rate_str(flops / sec, device):>8} "
                  f"{flops / sec / peak:>8.1%} {mem:>9.2f}")


if __name__ == "__main__":
    main()
