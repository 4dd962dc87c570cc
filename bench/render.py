# Speed / memory of reconstruct.py: the tiled PyTorch 3DGS renderer and the LGM forward.
#   python bench/render.py                  # CPU section, plus the CUDA section when a GPU is visible
#   python bench/render.py --device cuda    # CUDA only (LGM big numbers: 65,536 Gaussians at 256/512 px)
#   python bench/render.py --quick          # fewer repeats, no sweeps
# Targets: LGM big 65,536 Gaussians x 4 views at 512x512 <= 100 ms and <= 8 GB peak (H100);
# toy world on the 2-core CPU: tiny LGM and the 64x64 render of 8 objects x 4 views well under 1 s each.
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reconstruct import LGM, render_gaussians, standard_cameras  # noqa: E402

FOVY = 49.1


def lgm_like_gaussians(B, n, device, seed=0):
    # shaped like LGM big output: xyz in [-0.5, 0.5], scale 0.005-0.03, random opacity/colour, unit quaternions
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.rand(B, n, 3, generator=gen) - 0.5
    opacity = torch.rand(B, n, 1, generator=gen)
    scale = 0.005 + 0.025 * torch.rand(B, n, 3, generator=gen)
    quat = F.normalize(torch.randn(B, n, 4, generator=gen), dim=-1)
    rgb = torch.rand(B, n, 3, generator=gen)
    return torch.cat([xyz, opacity, scale, quat, rgb], -1).to(device)


def timeit(fn, device, warmup, repeats):
    # median wall time in ms; CUDA timed with events after synchronising
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_render(label, gaussians, cams, size, device, warmup, repeats, grad=False, **kw):
    views = gaussians.shape[0] * cams.shape[-3]
    reset_peak(device)

    def run():
        if grad:
            g = gaussians.detach().requires_grad_(True)
            out = render_gaussians(g, cams, FOVY, size, size, **kw)
            (out["image"].mean() + out["alpha"].mean()).backward()
        else:
            with torch.no_grad():
                render_gaussians(gaussians, cams, FOVY, size, size, **kw)

    ms = timeit(run, device, warmup, repeats)
    mem = peak_mb(device)
    what = "fwd+bwd" if grad else "forward"
    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    print(f"  {label:<44} {what:<7} {size:>4}px {extra:<18} {ms:9.1f} ms total {ms / views:8.2f} ms/view "
          f"peak {'GPU' if device.type == 'cuda' else 'RSS'} {mem:8.0f} MB")
    return ms


def bench_lgm(name, B, device, dtype, warmup, repeats):
    torch.manual_seed(0)
    with torch.device(device):
        model = LGM(name)
    model = model.to(dtype).eval()
    s = model.config.input_size
    views = torch.rand(B, 4, 3, s, s, device=device)
    reset_peak(device)
    with torch.no_grad():
        x = model.prepare_inputs(views, standard_cameras(0.0, model.config.cam_radius))
        ms = timeit(lambda: model.forward_gaussians(x), device, warmup, repeats)
        n = model.forward_gaussians(x).shape[1]
    print(f"  LGM {name:<5} forward {B} object(s) x 4 x {s}px {str(dtype):<15} {ms:9.1f} ms "
          f"({ms / B:.1f} ms/object)  -> {n} Gaussians/object   peak "
          f"{'GPU' if device.type == 'cuda' else 'RSS'} {peak_mb(device):.0f} MB")
    return model


def cpu_section(args):
    dev = torch.device("cpu")
    warm, rep = (1, 2) if args.quick else (1, 5)
    print(f"CPU ({torch.get_num_threads()} threads; ru_maxrss is the process peak, not per call)")
    tiny = bench_lgm("tiny", 8, dev, torch.float32, warm, rep)
    cams = standard_cameras()
    with torch.no_grad():
        lgm_out = tiny.reconstruct(torch.rand(8, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    scene = lgm_like_gaussians(8, 4096, dev)
    bench_render("8 obj x 4096 Gaussians (random tiny LGM)", lgm_out, cams, 64, dev, warm, rep)
    bench_render("8 obj x 4096 Gaussians (LGM-shaped scene)", scene, cams, 64, dev, warm, rep)
    bench_render("8 obj x 4096 Gaussians (LGM-shaped scene)", scene, cams, 64, dev, warm, rep, grad=True)
    if not args.quick:
        for block, chunk in [(8, 16), (8, 64), (16, 32), (4, 32)]:
            bench_render("8 obj x 4096 Gaussians (LGM-shaped scene)", scene, cams, 64, dev, warm, rep,
                         block=block, chunk=chunk)


def cuda_section(args):
    dev = torch.device("cuda")
    warm, rep = (1, 3) if args.quick else (3, 10)
    print(f"CUDA ({torch.cuda.get_device_name(dev)})")
    cams = standard_cameras().to(dev)
    big = lgm_like_gaussians(1, 65536, dev)
    for size in (256, 512):
        bench_render("1 obj x 65,536 Gaussians (LGM big shaped)", big, cams, size, dev, warm, rep)
    if not args.quick:
        for block in (8, 16):
            for chunk in (32, 64, 128):
                bench_render("1 obj x 65,536 Gaussians (LGM big shaped)", big, cams, 512, dev, warm, rep,
                             block=block, chunk=chunk)
        bench_render("8 obj x 65,536 Gaussians (LGM big shaped)", lgm_like_gaussians(8, 65536, dev), cams, 512,
                     dev, warm, rep)
    # toy world on the GPU: rendering inside tiny-LGM training (autograd)
    tiny_scene = lgm_like_gaussians(8, 4096, dev)
    bench_render("8 obj x 4096 Gaussians (LGM-shaped scene)", tiny_scene, cams, 64, dev, warm, rep)
    bench_render("8 obj x 4096 Gaussians (LGM-shaped scene)", tiny_scene, cams, 64, dev, warm, rep, grad=True)
    # parity: CUDA float32 against CPU float64 on the same small scene
    small = lgm_like_gaussians(2, 4096, "cpu", seed=3)
    ref = render_gaussians(small.double(), standard_cameras().double(), FOVY, 64, 64)
    got = render_gaussians(small.to(dev), cams, FOVY, 64, 64)
    diff = max((got[k].double().cpu() - ref[k]).abs().max().item() for k in ("image", "alpha"))
    print(f"  parity: max |CUDA fp32 - CPU fp64| over image and alpha = {diff:.2e}")
    model = bench_lgm("big", 1, dev, torch.bfloat16, warm, rep)
    if not args.quick:
        del model
        bench_lgm("big", 4, dev, torch.bfloat16, warm, rep)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU section, then CUDA if available")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no block/chunk sweeps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/render.py: --device cuda but torch.cuda.is_available() is False")
    if args.device in ("auto", "cpu"):
        cpu_section(args)
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        cuda_section(args)


if __name__ == "__main__":
    main()
