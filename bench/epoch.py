# bench/epoch.py: one training epoch of train.py, stage by stage, eager and compiled side by side.
#
#   python bench/epoch.py --device cuda            # paper setup (config.yaml), random weights, Carve3D's per-GPU
#                                                  # load: 16 samples, 50 DDIM steps, CFG, KL, micro-batch 16
#   python bench/epoch.py --device cpu --toy       # toy setup (toy.yaml, random tiny models): a quick check
#   python bench/epoch.py --device cuda --set fused_lora=false   # peft's LoRA layers instead of one GEMM each
#   python bench/epoch.py --device cuda --modes regional --fresh-caches --compile-cache DIR   # warm-up from empty
#                                                  # caches; rerun it: the same with DIR's saved artifacts loaded
#   options: --samples N --micro M --steps S --modes eager,compiled,regional --fp32-check --orbit --profile PREFIX
#            --syncs --set KEY=VALUE ... --compile-mode MODE --fresh-caches --compile-cache DIR --inductor KEY=VALUE ...
#
# Warm-up: the first epoch (models on the GPU to the end of the first update) minus the second, with the seconds
# Dynamo reports compiling and where they went (support/compiling.breakdown); `--fresh-caches` points Inductor's
# and Triton's caches at empty folders (a new machine).
# Per stage (sampling with the policy alone, the reference pass, VAE decode, LGM, render, crop + LPIPS, the PPO
# update): seconds per sample, share of the epoch and peak GPU memory. Then the whole epoch as train.py runs it
# (rollout with the reference, reward, advantages, update) with its MFU: FLOPs counted by FlopCounterMode
# (support/flops.py) over the measured bf16 matmul peak. Also the first update's on-policy figures (clipfrac,
# max |ratio - 1|, the replay error of the stored log-probs), and with --fp32-check the log-prob error of the
# bf16 policy against an fp32 copy on the same transitions. --orbit times view3d's 72-frame orbit of one
# reconstruction (LGM big: 65,536 Gaussians). Random weights: the cost does not depend on the values, except
# the renderer's, so the LGM head's scale bias is set as bench/reward.py does (small, trained-like Gaussians).
import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo's modules, not this folder's

import torch  # noqa: E402

import reconstruct  # noqa: E402
import train  # noqa: E402
import view3d  # noqa: E402
from mvdream import MVDreamPolicy  # noqa: E402
from ppo import ppo_update, summarize  # noqa: E402
from reward import mrc  # noqa: E402
from sample import ddim_step_with_logprob, sample_trajectories  # noqa: E402
from support import compiling, devices  # noqa: E402
from support.config import batch_plan  # noqa: E402
from support.flops import Throughput  # noqa: E402
from support.seeding import make_generator  # noqa: E402
from toy import world  # noqa: E402
from toy.prompts import load_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Stages:
    # wall time (synchronised) and peak GPU memory of named stages
    def __init__(self, device):
        self.device, self.t, self.mem = device, {}, {}

    def __call__(self, name, fn):
        devices.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = fn()
        devices.sync(self.device)
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        if self.device.type == "cuda":
            self.mem[name] = max(self.mem.get(name, 0.0), torch.cuda.max_memory_allocated(self.device) / 2 ** 30)
        return out


def config(args, compiled):
    over = [f"samples_per_epoch={args.samples}", f"micro_batch_size={args.micro}", f"num_steps={args.steps}",
            "random_init=true", f"device={args.device}", f"compile={str(compiled).lower()}", "num_train_prompts=4",
            "stat_min_count=1", "stat_buffer_size=8", "log_images=0"] + args.set
    return train.load_config(str(ROOT / ("toy.yaml" if args.toy else "config.yaml")), over)


def rollout_stages(cfg, policy, reward_fn, prompts, autocast, st):
    # the rollout split into its stages; returns the samples train.rollout would return
    M, batches = cfg.micro_batch_size, []
    for i in range(0, len(prompts), M):
        gens = [make_generator("cpu", cfg.seed, "bench", i + j) for j in range(len(prompts[i:i + M]))]
        kw = dict(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta)
        with torch.no_grad(), autocast():
            st("sampling (policy)", lambda: sample_trajectories(policy, prompts[i:i + M], generator=gens, **kw))
            gens = [make_generator("cpu", cfg.seed, "bench", i + j) for j in range(len(gens))]
            traj = st("sampling + reference", lambda: sample_trajectories(policy, prompts[i:i + M], generator=gens,
                                                                         with_reference=True, **kw))
            st("decode", lambda: policy.decode(traj["next_latents"][:, -1]))
        views = reward_fn.prepare(traj["views"])
        gaussians = st("LGM", lambda: torch.no_grad()(reward_fn._lgm)(views))
        c2w = reward_fn.cameras.to(views.device)
        renders = st("render", lambda: reconstruct.render_gaussians(gaussians.float(), c2w, reward_fn.lgm.config.fovy,
                                                                     *views.shape[-2:])["image"][:, reward_fn.to_mvdream])
        value = st("crop + LPIPS", lambda: mrc(views, renders, reward_fn.lpips_model, per_view=True).mean(1))
        batch = {k: traj[k] for k in train.TRAIN_KEYS}
        batch.update(views=traj["views"], reward=-value.float(), mrc=value.float())
        batches.append(batch)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def one_mode(args, mode):
    compiled = mode != "eager"
    cfg = config(args, compiled)
    device = torch.device(args.device)
    plan = batch_plan(cfg, 1, cfg.num_train_prompts).validate()
    cfg = dataclasses.replace(cfg, micro_batch_size=plan.micro_batch_size)  # at most the samples (batch_plan)
    policy, reward_fn = train.build_models(cfg, device)
    with torch.no_grad():
        reward_fn.lgm.conv.bias[4:7] = -2.0  # small Gaussians, as a trained LGM emits (see the header)
    autocast = lambda: devices.autocast(device, cfg.mixed_precision == "bf16")  # noqa: E731
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    throughput = Throughput(policy, reward_fn, device, cfg, plan, 1)
    if compiled:
        # as train.main does, after counting FLOPs on the eager UNet (--compile-mode: an experiment train.py lacks)
        if args.compile_mode == "reduce-overhead":
            # CUDA graphs without Inductor's graph trees: with trees (torch 2.11) the update's backward fails with
            # "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run" (toy and paper
            # setup alike); with one graph per compiled shape it runs (docs/BENCHMARKS.md)
            import torch._inductor.config as inductor_config
            inductor_config.triton.cudagraph_trees = False
        compiling.compile_models(policy, reward_fn, mode=args.compile_mode, regional=mode == "regional")
        if args.compile_cache:
            print(compiling.load_cache(args.compile_cache, device) or f"no compile cache in {args.compile_cache}")
    prompts = [f"prompt {i}" for i in range(plan.samples_per_epoch)] if not args.toy else \
        load_prompts("toy:train", plan.samples_per_epoch)

    def epoch(c, st):
        samples = rollout_stages(c, policy, reward_fn, prompts, autocast, st)
        samples["sampling_state"] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        adv = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))
        upd = dataclasses.replace(plan, num_steps=c.num_steps)
        infos = st("update", lambda: ppo_update(policy, policy, {k: samples[k] for k in train.TRAIN_KEYS}, adv,
                                                optimizer, upd, eta=c.eta, guidance_scale=c.guidance_scale,
                                                train_cfg=True, clip_range=c.clip_range, adv_clip_max=5.0,
                                                max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
                                                autocast=autocast, params=params))
        return samples, summarize(infos)

    # warm-up: the first epoch (from the models on the GPU to the end of the first update: every graph compiled, plus
    # cuDNN/cuBLAS autotuning) minus the same epoch at steady state (the second)
    compile_s, t0 = compiling.compile_seconds(), time.perf_counter()
    epoch(cfg, Stages(device))
    first, compile_s = time.perf_counter() - t0, compiling.compile_seconds() - compile_s
    print(f"{mode}: first epoch {first:.1f} s (compiling {compile_s:.0f} s)", flush=True)  # kept if a timeout follows
    went = compiled and compiling.breakdown()  # the first epoch's: the second compiles nothing
    if went:
        print(f"{mode}: where this process's compiling went: {went}", flush=True)
    if args.compile_cache and compiled:
        print(f"compile cache: {compiling.save_cache(args.compile_cache, device)} artifacts written")
    st = Stages(device)
    t0 = time.perf_counter()
    samples, info = epoch(cfg, st)
    warmup = first - (time.perf_counter() - t0)
    st.t["reference"] = st.t.pop("sampling + reference") - st.t["sampling (policy)"]
    st.t["sampling (policy)"] -= st.t["decode"]  # sample_trajectories decodes at its end
    whole = st.t["sampling (policy)"] + st.t["reference"] + st.t["decode"] + st.t["LGM"] + st.t["render"] + \
        st.t["crop + LPIPS"] + st.t["update"]
    mfu = throughput.epoch_flops(1) / whole / throughput.peak
    mode = f"{mode} ({args.compile_mode})" if args.compile_mode and compiled else mode
    out = {"mode": mode, "warmup_s": warmup, "compile_s": compile_s, "compiling": went, "stages": st.t, "mem": st.mem,
           "epoch_s": whole, "mfu": mfu, "samples_per_s": len(prompts) / whole, "on_policy": info,
           "peak_tflops": throughput.peak / 1e12}
    print(f"{out['mode']}: epoch {whole:.1f} s, MFU {mfu:.1%} (before the optional checks)", flush=True)
    if args.profile:
        out["profile"] = profile_stages(dataclasses.replace(cfg, num_steps=3), policy, prompts, autocast, params,
                                        optimizer, plan, device, f"{args.profile}_{out['mode']}")
    if args.syncs:
        out["syncs"] = count_syncs(lambda: epoch(dataclasses.replace(cfg, num_steps=3), Stages(device)))
    if args.fp32_check:
        out["fp32"] = fp32_logprob_error(cfg, policy, samples, device)
    if args.orbit:
        out["orbit"] = orbit_cost(reward_fn, samples["views"][:1], cfg.elevation, device)
    del policy, reward_fn
    return out


def profile_stages(cfg, policy, prompts, autocast, params, optimizer, plan, device, prefix):
    # Is the GPU ever idle? Sampling (with the reference) and the update of a 3-step epoch under torch.profiler:
    # busy = summed kernel time / wall time (one stream: kernels do not overlap), the top kernels, and a Chrome
    # trace per stage (prefix_sampling.json, prefix_update.json; open in chrome://tracing or Perfetto).
    from torch.profiler import ProfilerActivity, profile
    prompts = prompts[:cfg.micro_batch_size]
    gens = lambda: [make_generator("cpu", cfg.seed, "bench", j) for j in range(len(prompts))]  # noqa: E731
    kw = dict(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta, with_reference=True)
    with torch.no_grad(), autocast():
        samples = sample_trajectories(policy, prompts, generator=gens(), **kw)  # (compiled at these shapes already)
    upd = dataclasses.replace(plan, samples_per_epoch=len(prompts), num_steps=cfg.num_steps)
    adv = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))
    stages = {
        "sampling": lambda: _no_grad_autocast(autocast, sample_trajectories, policy, prompts, generator=gens(), **kw),
        "update": lambda: ppo_update(policy, policy, {k: samples[k] for k in train.TRAIN_KEYS}, adv, optimizer, upd,
                                     eta=cfg.eta, guidance_scale=cfg.guidance_scale, train_cfg=True,
                                     clip_range=cfg.clip_range, adv_clip_max=5.0, max_grad_norm=1.0,
                                     generator=torch.Generator().manual_seed(0), autocast=autocast, params=params)}
    out = {}
    for name, fn in stages.items():
        devices.sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            devices.sync(device)
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
        kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        out[name] = {"wall_s": wall, "kernel_s": kernel_s, "busy": kernel_s / wall,
                     "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 2), e.count) for e in top]}
        prof.export_chrome_trace(f"{prefix}_{name}.json")
        print(f"profile {name}: wall {wall:.3f} s, kernels {kernel_s:.3f} s, GPU busy {kernel_s / wall:.0%}", flush=True)
    return out


def count_syncs(fn):
    # Host syncs while fn runs (a 3-step epoch), counted by the Python line that caused each: CUDA's sync debug
    # mode warns at every synchronising operation. Expected: one per reward micro-batch (crop boxes), a few per
    # update (the skip decision, the logged means) and Stages' own timing syncs; none per denoising step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    lines = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(lines.most_common(20))


def _no_grad_autocast(autocast, fn, *a, **kw):
    with torch.no_grad(), autocast():
        return fn(*a, **kw)


def fp32_logprob_error(cfg, policy, samples, device):
    # the bf16 policy's sampled log-probs against an fp32 copy (same weights, no autocast) on the same transitions
    ref = MVDreamPolicy.random_init("sd21-4view", seed=cfg.seed, elevation=cfg.elevation, device=device) \
        if cfg.world == "paper" else MVDreamPolicy.tiny(world.VOCAB, seed=cfg.seed, elevation=cfg.elevation)
    ref.to(device).add_lora(cfg.lora_rank, cfg.lora_alpha)
    ref.load_state_dict({k: v.float() for k, v in samples["sampling_state"].items()}, strict=True)
    n = min(cfg.micro_batch_size, len(samples["latents"]))
    ref.scheduler.set_timesteps(cfg.num_steps, device=device)
    err = []
    with torch.no_grad():
        for j in range(cfg.num_steps):
            eps = ref(samples["latents"][:n, j], samples["timesteps"][:n, j], samples["prompt_embeds"][:n].float(),
                      cfg.guidance_scale)
            lp = ddim_step_with_logprob(ref.scheduler, eps, samples["timesteps"][:n, j], samples["latents"][:n, j],
                                        cfg.eta, prev_sample=samples["next_latents"][:n, j])[1]
            err.append((lp - samples["log_probs"][:n, j]).abs())
    err = torch.stack(err)
    return {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
            "max_ratio_dev": (torch.exp(err) - 1).max().item()}


def orbit_cost(reward_fn, views, elevation, device):
    gaussians = reward_fn.reconstruct(views)
    devices.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    frames = view3d.render_orbit(gaussians[0], elevation, size=views.shape[-1], fovy=reward_fn.lgm.config.fovy)
    devices.sync(device)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"frames": len(frames), "gaussians": gaussians.shape[1], "seconds": time.perf_counter() - t0,
            "peak_gib": mem}


def report(results, args):
    names = ["sampling (policy)", "reference", "decode", "LGM", "render", "crop + LPIPS", "update"]
    n = args.samples
    print(f"\none epoch: {n} samples, {args.steps} DDIM steps, CFG, KL, micro-batch {args.micro}; "
          f"measured matmul peak {results[0]['peak_tflops']:.2f} TFLOP/s")
    print("| stage | " + " | ".join(f"{r['mode']} s/sample | share | peak GiB" for r in results) + " |")
    print("| --- |" + " --- | --- | --- |" * len(results))
    for s in names:
        row = [f"{r['stages'][s] / n:.3f} | {r['stages'][s] / r['epoch_s']:.0%} | {r['mem'].get(s, float('nan')):.1f}"
               for r in results]
        print(f"| {s} | " + " | ".join(row) + " |")
    for r in results:
        o = r["on_policy"]
        print(f"{r['mode']}: epoch {r['epoch_s']:.1f} s ({r['samples_per_s']:.2f} samples/s), MFU {r['mfu']:.1%}, "
              f"warm-up {r['warmup_s']:.0f} s (compiling {r['compile_s']:.0f} s); first update clipfrac {o['clipfrac']:.3g}, max |ratio-1| "
              f"{o['ratio_dev_max']:.3g}, stored log-prob replay error {o['logp_replay_err']:.3g}")
        if "fp32" in r:
            print(f"  bf16 vs fp32 log-probs on the same transitions: {r['fp32']}")
        if "orbit" in r:
            print(f"  orbit: {r['orbit']}")
        if "syncs" in r:
            print(f"  host syncs in a 3-step epoch, by line: {r['syncs']}")
        for stage, prof in r.get("profile", {}).items():
            print(f"  profile {stage}: GPU busy {prof['busy']:.0%} of {prof['wall_s']:.3f} s; top kernels (ms, calls):")
            for name, ms, calls in prof["top"]:
                print(f"    {ms:9.2f} {calls:5d}  {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="toy.yaml's tiny models instead of the paper setup")
    p.add_argument("--samples", type=int, default=16, help="samples in the epoch (Carve3D: 16 per GPU)")
    p.add_argument("--micro", type=int, default=16, help="micro_batch_size (config.yaml: 32, at most the samples a rank has)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled (whole networks), regional (each "
                   "repeated block, support/compiling.py); compiled modes in one process share Inductor's caches")
    p.add_argument("--compile-cache", metavar="DIR", help="load Inductor's artifacts from DIR before compiling, "
                   "save them there after the first epoch (train.py's run_dir cache)")
    p.add_argument("--fresh-caches", action="store_true", help="Inductor and Triton caches in new empty folders "
                   "(the warm-up of a fresh machine)")
    p.add_argument("--fp32-check", action="store_true", help="log-prob error of bf16 against an fp32 copy")
    p.add_argument("--orbit", action="store_true", help="also time view3d's 72-frame orbit of one object")
    p.add_argument("--profile", metavar="PREFIX", help="also profile a 3-step sampling call and update: GPU busy "
                   "fraction, top kernels, Chrome traces PREFIX_<mode>_<stage>.json")
    p.add_argument("--syncs", action="store_true", help="CUDA: count the host syncs of a 3-step epoch by line")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled run (reduce-overhead: CUDA graphs; not in train.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. mixed_precision=no")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE", help="experiments train.py lacks: "
                   "torch._inductor.config settings, e.g. triton.autotune_pointwise=False")
    args = p.parse_args()
    if args.syncs and args.device != "cuda":
        p.error("--syncs needs --device cuda (CUDA's sync debug mode)")
    if args.fresh_caches:
        import os
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")
    if args.inductor:
        import ast
        import torch._inductor.config as inductor_config
    for item in args.inductor:
        key, _, value = item.partition("=")
        *path, name = key.split(".")
        ns = inductor_config
        for part in path:
            ns = getattr(ns, part)
        if not hasattr(ns, name):
            p.error(f"--inductor: torch._inductor.config has no {key!r}")
        setattr(ns, name, ast.literal_eval(value))
    results = []
    for mode in args.modes.split(","):
        if mode not in ("eager", "compiled", "regional"):
            p.error(f"--modes: {mode!r} is not eager, compiled or regional")
        results.append(one_mode(args, mode))
        print(json.dumps(results[-1], default=str), flush=True)  # kept if a later mode fails
    report(results, args)


if __name__ == "__main__":
    main()
