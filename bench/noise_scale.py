# bench/noise_scale.py: how many samples one Carve3D/DDPO update needs, at the policy's start.
#
#   python bench/noise_scale.py toy.yaml policy=checkpoints/toy/sft-long lgm=checkpoints/toy/lgm-tiny-v3.safetensors
#   options: --prompts P --per-prompt S (P x S samples; default 8 x 8)
#
# Samples P training prompts x S samples with the config's sampler (fixed per-sample noise, as train.py), scores
# them with the MRC reward, z-scores the rewards per prompt within this batch (Carve3D's per-prompt stat tracking
# with the batch as its buffer), then takes for every sample alone and every timestep the gradient of train.py's
# loss at the first, on-policy update. From those: the gradient noise scale B = tr(Sigma) / |G|^2
# (bench/gradient_noise.py; an update that averages B samples has signal-to-noise ~1) of a sample's gradient
# over all its timesteps (timestep_fraction 1, as Carve3D trains) and over a random subset of the config's
# timestep_fraction (as train.py trains; same |G|^2 in expectation, more noise). The samples of one prompt share
# its z-scoring, so they are not quite independent.
import argparse
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo's modules, not this folder's

import torch  # noqa: E402

import train  # noqa: E402
from bench.gradient_noise import noise_scale, per_sample_gradients  # noqa: E402
from support import devices  # noqa: E402
from support.config import load_config  # noqa: E402
from support.seeding import make_generator  # noqa: E402
from toy.prompts import load_prompts  # noqa: E402


def main():
    p = argparse.ArgumentParser(description="gradient noise scale of the Carve3D/DDPO update")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--prompts", type=int, default=8, help="training prompts")
    p.add_argument("--per-prompt", type=int, default=8, help="samples per prompt")
    args = p.parse_args()
    cfg = load_config(train.Config, args.config, args.overrides)
    device = devices.setup_distributed(cfg.device)[2]  # one process: train.py's device choice
    torch.manual_seed(cfg.seed)  # the LoRA's random down-projections: the gradients depend on them
    policy, reward_fn = train.build_models(cfg, device)
    autocast = lambda: devices.autocast(device, cfg.mixed_precision == "bf16")  # noqa: E731
    prompts = [q for q in load_prompts(cfg.train_prompts, args.prompts) for _ in range(args.per_prompt)]
    gens = [make_generator("cpu", cfg.seed, "noise-scale", i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    with torch.no_grad():
        samples = train.rollout(cfg, policy, reward_fn, prompts, cfg.micro_batch_size, gens, autocast, False)
    r = samples["reward"].view(args.prompts, args.per_prompt).cpu()
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).flatten()
    params = [q for q in policy.parameters() if q.requires_grad]
    per_step = per_sample_gradients(policy, samples, adv, params, eta=cfg.eta,
                                    guidance_scale=cfg.guidance_scale if cfg.train_cfg else 1.0,
                                    clip_range=cfg.clip_range, adv_clip_max=cfg.adv_clip_max, autocast=autocast)
    n, T = per_step.shape[:2]
    k = max(1, int(round(cfg.timestep_fraction * T)))
    g = torch.Generator().manual_seed(cfg.seed)
    subset = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(n)])  # as ppo.shuffle_samples draws
    print(f"{cfg.policy}: {args.prompts} prompts x {args.per_prompt} samples, MRC {samples['mrc'].mean():.4f}, "
          f"{per_step.shape[2]:,} LoRA parameters ({time.perf_counter() - t0:.0f} s)")
    for name, grads in ((f"all {T} timesteps", per_step.mean(1)),
                        (f"{k} of {T} timesteps", per_step[torch.arange(n)[:, None], subset].mean(1))):
        out = noise_scale(grads)
        print(f"{name}: |G|^2 {out['grad_sq']:.2e} +- {out['grad_sq_se']:.2e} (jackknife), tr(Sigma) "
              f"{out['trace_cov']:.2e}: noise scale B = {out['noise_scale']:.0f} samples, B >= "
              f"{out['noise_scale_lower']:.0f} (|G|^2 + 2 se); an update of samples_per_epoch = "
              f"{cfg.samples_per_epoch} has signal-to-noise <= {cfg.samples_per_epoch / out['noise_scale_lower']:.2f}")


if __name__ == "__main__":
    main()
