# bench/reward.py: time of the Carve3D reward (Carve3D Sec. 3; reward.py), stage by stage.
#
#   python bench/reward.py --device cuda     # paper setup, random weights: SD2.1 VAE decode of 4 views
#                                            # (32x32 latents -> 256 px, bf16), LGM big (bf16), render 4
#                                            # views at 256 px, crop + LPIPS; batch sizes 1 and 8
#   python bench/reward.py --device cpu      # toy setup: tiny LGM + render at 64 px + LPIPS, 8 objects
#   add --quick for a smoke run (fewer repeats, smaller batches)
#
# Random weights: timings of the networks do not depend on their values, but the renderer's cost does
# (it grows with how many pixels each Gaussian covers). A random LGM head emits ~0.07-wide Gaussians,
# much larger than a trained LGM's, so by default the head's scale bias is set to --scale-bias (-2:
# 0.1 softplus(-2) = 0.013) to approximate a trained model; pass --scale-bias none for the raw head.
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the repo's reward.py, not this file

import torch  # noqa: E402

import reconstruct  # noqa: E402
import reward  # noqa: E402

ELEVATION = 15.0  # MVDream convention; any value works, the cost does not depend on it


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup):
    # Median wall time in ms and peak CUDA memory (MiB) of fn(); fn's last result is returned too.
    for _ in range(warmup):
        out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def example_views(batch, size, device):
    # Stand-in generated views: random Gaussian blobs rendered at MVDream's 4 cameras, on white.
    scenes = torch.cat([reward.random_scene(512, torch.Generator().manual_seed(s)) for s in range(batch)])
    cams = reconstruct.mvdream_view_cameras(ELEVATION)
    return reconstruct.render_gaussians(scenes.to(device), cams.to(device), 49.1, size, size)["image"]


def make_lgm(name, device, dtype, scale_bias):
    torch.manual_seed(0)
    with torch.device(device):
        lgm = reconstruct.LGM(name)
    lgm = lgm.to(dtype).eval().requires_grad_(False)
    if scale_bias is not None:
        with torch.no_grad():
            lgm.conv.bias[4:7] = scale_bias
    return lgm


def make_vae(device):
    # SD2.1(-base) VAE architecture (AutoencoderKL config of stabilityai/stable-diffusion-2-1-base), random.
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
    )
    return vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def bench_stages(batch, size, lgm, lpips_model, device, repeats, warmup, vae=None, views=None):
    rows = {}
    views = example_views(batch, size, device) if views is None else views
    if vae is not None:
        latents = torch.randn(batch * 4, 4, size // 8, size // 8, device=device, dtype=torch.bfloat16)

        def decode():
            with torch.no_grad():
                return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

        rows["VAE decode (4 views, bf16)"] = timed(decode, device, repeats, warmup)[:2]

    scorer = reward.MRCReward(lgm, lpips_model, elevation=ELEVATION)
    cams = scorer.cameras.to(device)
    views_lgm = views[:, scorer.to_lgm].to(next(lgm.parameters()).dtype)

    def run_lgm():
        with torch.no_grad():
            return lgm.reconstruct(views_lgm, cams)

    ms, peak, gaussians = timed(run_lgm, device, repeats, warmup)
    rows[f"LGM {lgm.config.name} forward ({next(lgm.parameters()).dtype})"] = (ms, peak)

    def render():
        with torch.no_grad():
            return reconstruct.render_gaussians(gaussians, cams, lgm.config.fovy, size, size)["image"]

    ms, peak, renders = timed(render, device, repeats, warmup)
    rows[f"render 4 views at {size}px ({gaussians.shape[1]} Gaussians)"] = (ms, peak)

    def lpips_stage():
        with torch.no_grad():
            return reward.mrc(views, renders[:, scorer.to_mvdream], lpips_model)

    rows["crop + resize + LPIPS (4 pairs)"] = timed(lpips_stage, device, repeats, warmup)[:2]
    rows["MRCReward end to end (LGM + render + MRC)"] = timed(lambda: scorer(views), device, repeats, warmup)[:2]
    return rows


def report(title, batch, rows, device):
    print(f"\n{title}, batch {batch}")
    print(f"  {'stage':<52} {'ms/batch':>10} {'ms/object':>10} {'peak MiB':>9}")
    for name, (ms, peak) in rows.items():
        print(f"  {name:<52} {ms:>10.1f} {ms / batch:>10.1f} {peak:>9.0f}")
    total = sum(ms for name, (ms, _) in rows.items() if not name.startswith("MRCReward"))
    total_e2e = rows["MRCReward end to end (LGM + render + MRC)"][0]
    total_e2e += sum(ms for name, (ms, _) in rows.items() if name.startswith("VAE"))
    print(f"  reward total per object: {total / batch:.1f} ms (sum of stages), {total_e2e / batch:.1f} ms "
          f"(end to end{' + VAE' if any(n.startswith('VAE') for n in rows) else ''})")


def main():
    parser = argparse.ArgumentParser(description="Time the Carve3D MRC reward stage by stage.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and smaller batches")
    parser.add_argument("--lgm", default=None,
                        help="CPU: a trained tiny LGM (checkpoints/toy/lgm-tiny-v3.safetensors) scored on toy ground-truth "
                             "views, instead of a random LGM on random scenes")
    parser.add_argument("--scale-bias", default="-2.0",
                        help="bias of the LGM head's scale channels (approximates a trained LGM); 'none' = raw head")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    scale_bias = None if args.scale_bias.lower() == "none" else float(args.scale_bias)
    repeats, warmup = (1, 1) if args.quick else (5, 2)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"LGM head scale bias {scale_bias}, repeats {repeats} (median), warmup {warmup}")
    lpips_model = reward.load_lpips("alex").to(device)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        vae = make_vae(device)
        lgm = make_lgm("big", device, torch.bfloat16, scale_bias)
        for batch in ((1, 2) if args.quick else (1, 8)):
            report("paper setup (SD2.1 VAE + LGM big, random weights)", batch,
                   bench_stages(batch, 256, lgm, lpips_model, device, repeats, warmup, vae=vae), device)
    else:
        views, what = None, "random weights"
        if args.lgm:
            import toy
            lgm, what = reconstruct.LGM.from_pretrained(args.lgm).eval().requires_grad_(False), args.lgm
            prompts = world.test_prompts()[:: len(world.test_prompts()) // 8][:8]
            objs = torch.stack([world.make_object(p, torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)])
            views = world.render_views(objs)
        else:
            lgm = make_lgm("tiny", device, torch.float32, scale_bias)
        for batch in ((2,) if args.quick else (8,)):
            rows = bench_stages(batch, 64, lgm, lpips_model, device, repeats, warmup,
                                views=None if views is None else views[:batch])
            report(f"toy setup (tiny LGM, {what}, 64 px)", batch, rows, device)
            total = rows["MRCReward end to end (LGM + render + MRC)"][0] / 1000
            print(f"  target: 8 objects <= 3 s -> {total * 8 / batch:.2f} s for 8 objects")


if __name__ == "__main__":
    main()
