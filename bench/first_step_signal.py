# bench/first_step_signal.py: does a toy MVDream draw objects at their data's size, and does the sampler's start
# decide it?
#
#   python bench/first_step_signal.py checkpoints/toy/sft-base        # options: --num-prompts P --seeds S
#
# SD's noise schedule (which MVDream keeps) leaves sqrt(alpha_bar) = 0.09 of the data at the sampler's first
# timestep (951 of 1000 at 20 DDIM steps): a model is trained on x_951 = 0.09 x0 + ..., and sampled from pure noise
# (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). The toy's views are mostly
# white background, so what that missing 0.09 x0 holds is mostly the background's latent. This samples P test
# prompts x S with the evaluation noise three ways: from pure noise (as every sampler here does), and with the
# background's signal added to the first latent, per channel or per pixel. Printed: the size bias of each
# (toy/fidelity.size_bias: mean log of main-object area over ground truth's; 0 = the data's size) and ground
# truth's through the model's VAE. A model whose latents put the background at 0 (toy/sft.py normalize_latents)
# gives the same size bias from all three starts.
import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo's modules, not this folder's

import torch  # noqa: E402

from mvdream import MVDreamPolicy  # noqa: E402
from sample import sample_trajectories  # noqa: E402
from support.seeding import make_generator  # noqa: E402
from toy import world  # noqa: E402
from toy.fidelity import size_bias  # noqa: E402
from toy.prompts import load_prompts  # noqa: E402


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a toy MVDream directory (toy/sft.py mvdream)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    args = p.parse_args(argv)
    policy = MVDreamPolicy.from_pretrained(args.checkpoint).eval()
    prompts = load_prompts("toy:test", args.num_prompts)
    flat = [q for q in prompts for _ in range(args.seeds)]
    gens = lambda: [make_generator("cpu", 0, "noise", i, s) for i in range(len(prompts))  # noqa: E731
                    for s in range(args.seeds)]  # evaluate.py's noise (sample.sample_fixed_noise)
    gt = world.ground_truth_views(prompts, args.seeds, 0, world.TOY.elevation, "cpu").flatten(0, 1)
    print(f"ground truth through the VAE: size bias {size_bias(policy.decode(policy.encode(gt)), flat).mean():+.3f}")
    policy.scheduler.set_timesteps(args.num_steps)
    first = int(policy.scheduler.timesteps[0])
    a = policy.scheduler.alphas_cumprod[first]
    background = policy.encode(torch.ones(1, 4, 3, policy.image_size, policy.image_size))   # (1, 4, C, h, w)
    shape = (1 + args.num_steps, 4) + tuple(policy.latent_shape)
    eps = torch.stack([torch.randn(shape, generator=g)[0] for g in gens()])                 # each sample's x_T
    starts = {"pure noise (the sampler)": None,
              "+ background per channel": background.mean((3, 4), keepdim=True),
              "+ background per pixel": background}
    print(f"first timestep {first}: sqrt(alpha_bar) = {a.sqrt():.3f}; background latent per channel "
          f"{[round(v, 2) for v in background.mean((0, 1, 3, 4)).tolist()]}")
    for name, signal in starts.items():
        x_t = None if signal is None else a.sqrt() * signal + (1 - a).sqrt() * eps
        views = sample_trajectories(policy, flat, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                                    eta=1.0, generator=gens(), initial_noise=x_t)["views"]
        print(f"{name}: size bias {size_bias(views, flat).mean():+.3f}", flush=True)


if __name__ == "__main__":
    main()
