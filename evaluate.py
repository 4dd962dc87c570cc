"""Evaluate a multi-view diffusion checkpoint: MRC (Carve3D Sec. 3), prompt fidelity, diversity.

    python evaluate.py --checkpoint checkpoints/toy/sft-base --out outputs/eval/sft-base
    python evaluate.py --checkpoint checkpoints/toy/sft-base --lora runs/toy/checkpoints/epoch_0039 --out outputs/eval/rl
    python evaluate.py --ground-truth --out outputs/eval/gt          # the toy world's own renders
    python evaluate.py --ground-truth --through-vae checkpoints/toy/vae-tiny --out outputs/eval/gt-vae
    python evaluate.py --robustness --out outputs/eval/robustness    # MRC under controlled inconsistency
    python evaluate.py --bf16 --jobs 2 --num-prompts 64 --seeds 4 --out outputs/eval/table --table gt=ground-truth \
        gt-vae=ground-truth+checkpoints/toy/vae-tiny sft-base=checkpoints/toy/sft-base \
        sft-long=checkpoints/toy/sft-long rl-cpu=checkpoints/toy/sft-base+checkpoints/toy/rl-cpu  # README table

Every prompt gets --seeds samples from fixed initial noise (seeded by prompt index and sample index), so
two checkpoints are compared on identical noise, as Carve3D compares base and finetuned models (Fig. 3).
  MRC        mean/std over samples of the MRC reward's LPIPS (lower = more consistent).
  fidelity   toy world only: fidelity.fidelity, whether each view shows the prompt's main object (colour,
             size, shape) and its part (colour, size, shape, side; hidden where ground truth hides it) and
             nothing else, against ground-truth renders of the prompt at that camera (1 = matches, 0 = empty
             or wrong main colour; formula at the top of toy/fidelity.py).
  size_spread toy world only: fidelity.size_spread, how much the main object's size changes from view to view
             (0 for one object; ~0.25 for 4 independent instances), an inconsistency that needs no LGM.
  mrc_vs_spread  toy world only: within-prompt correlation of MRC and size spread (within_prompt_corr): how well
             the reward ranks one prompt's samples by this inconsistency, which is all RL's advantages see.
  diversity  mean over prompts of the mean pairwise LPIPS-AlexNet between the samples of that prompt
             (averaged over the 4 views); Carve3D's claim is that RL keeps it while longer SFT loses it.
Writes metrics.json and grid.png (first sample of each of the first 8 prompts, captioned with MRC); with --orbit N
also orbit/NN_<prompt>.ply and .gif: the 3D Gaussians the reward reconstructs from the first sample of each of the
first N prompts, and an orbit around them (view3d.py).

--through-vae: ground truth as a latent model sees it, the renders encoded and decoded by its VAE. That is what
SFT teaches the model to produce and the best it can draw; the VAE also smooths the images, which alone lowers
MRC, so a latent model's MRC is compared with this reference.
"""

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from mvdream import MVDreamPolicy
from reconstruct import LGM
from reward import MRCReward, load_lpips
from sample import sample_fixed_noise
from support.cli import add_reward_args, add_sampling_args
from support.devices import autocast
from support.diversity import diversity
from support.images import line_plot, save_grid
from support.mvdream_weights import read_vae
from support.seeding import make_generator
from toy import world
from toy.fidelity import fidelity_and_size_spread
from toy.prompts import load_prompts
from view3d import ORBIT_SIZE, export_object, slug


def generate(args, prompts, device):
    """(P, S, 4, 3, H, W) samples of the checkpoint (or ground-truth renders) with fixed noise."""
    if args.ground_truth:
        views = world.ground_truth_views(prompts, args.seeds, args.seed, args.elevation, device)
        return vae_roundtrip(views, args.through_vae, device) if args.through_vae else views
    policy = MVDreamPolicy.from_pretrained(args.checkpoint).to(device).eval()
    if args.lora:
        policy.load_lora(args.lora)
    return sample_fixed_noise(policy, prompts, args.seeds, seed=args.seed, num_steps=args.num_steps,
                              guidance_scale=args.guidance_scale, eta=args.eta, batch_size=args.batch_size,
                              cpu_bf16=args.bf16)


def vae_roundtrip(views, vae_dir, device, chunk=64):
    # (..., 3, H, W) in [0, 1] -> encode (posterior mean, as toy/sft.py makes its latents) -> decode -> [0, 1]
    vae = read_vae(vae_dir).to(device).eval()
    x = views.flatten(0, -4) * 2 - 1
    out = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(chunk)])
    return (out / 2 + 0.5).clamp(0, 1).reshape(views.shape)


def build_reward(args, device):
    lgm = LGM.from_pretrained(args.lgm, config=args.lgm_config).to(device).eval().requires_grad_(False)
    lpips_model = load_lpips("alex").to(device)
    return MRCReward(lgm, lpips_model, elevation=args.elevation, lpips_size=args.lpips_size or None), lpips_model


def within_prompt_corr(a, b):
    """Pearson correlation of two (prompts, samples) metrics after removing each prompt's mean: what a per-prompt
    normalised advantage (RL) can see. mrc_vs_spread: does the reward rank a prompt's samples by inconsistency?"""
    a, b = (x.double() - x.double().mean(1, keepdim=True) for x in (a, b))
    return ((a * b).sum() / (a.norm() * b.norm())).item() if a.shape[1] > 1 else float("nan")


@torch.no_grad()
def evaluate(args, device):
    prompts = load_prompts(args.prompts, args.num_prompts)
    reward_fn, lpips_model = build_reward(args, device)
    views = generate(args, prompts, device)                                   # (P, S, 4, 3, H, W)
    flat = views.flatten(0, 1)
    with autocast(device):
        mrc = torch.cat([reward_fn(flat[i:i + args.batch_size])["mrc"].float().cpu()  # on the CPU, as fidelity
                         for i in range(0, len(flat), args.batch_size)])
    metrics = {"num_prompts": len(prompts), "samples_per_prompt": args.seeds,
               "mrc_mean": mrc.mean().item(), "mrc_std": mrc.std().item() if len(mrc) > 1 else 0.0,
               "diversity": diversity(views, lpips_model)}
    if args.prompts.startswith("toy:"):
        per_sample = [p for p in prompts for _ in range(args.seeds)]
        fid, spread = fidelity_and_size_spread(flat.cpu(), per_sample, args.elevation)
        metrics.update(fidelity_mean=fid.mean().item(), fidelity_std=fid.std().item() if len(fid) > 1 else 0.0,
                       size_spread=spread.mean().item(),
                       mrc_vs_spread=within_prompt_corr(mrc.view(len(prompts), -1), spread.view(len(prompts), -1)),
                       per_sample={"mrc": mrc.tolist(), "fidelity": fid.tolist(), "size_spread": spread.tolist()})
    metrics["source"] = ({"ground_truth": True, "through_vae": args.through_vae} if args.ground_truth
                         else {"checkpoint": args.checkpoint, "lora": args.lora})
    metrics["options"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    n = min(8, len(prompts))
    m = mrc.view(len(prompts), args.seeds)
    save_grid(os.path.join(args.out, "grid.png"), views[:n, 0],
              [f"{p} | MRC {m[i, 0].item():.3f}" for i, p in enumerate(prompts[:n])])
    for i, prompt in enumerate(prompts[:args.orbit]):
        prefix = os.path.join(args.out, "orbit", f"{i:02d}_{slug(prompt)}")
        export_object(prefix, reward_fn, views[i, 0], args.orbit_size)  # 3D result of the first sample
    return metrics


def table(args, device):
    # --table NAME=SOURCE ...: every row on the same prompts and noise (--jobs N: N rows at a time); writes
    # table.md and NAME/metrics.json. SOURCE: ground-truth, ground-truth+VAE_DIR, CHECKPOINT or CHECKPOINT+LORA.
    # Rows named GROUP/RUN (e.g. kl/1 kl/2 kl/3: one training setting, three seeds) also get a line GROUP: mean ± std
    # over runs.
    rows, lines = {}, ["| model | MRC (lower = more consistent) | fidelity | size spread | diversity |",
                       "| --- | --- | --- | --- | --- |"]
    todo = {}
    for row_arg in args.table:
        name, sep, source = row_arg.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--table {row_arg!r}: write NAME=SOURCE, SOURCE being ground-truth, ground-truth+VAE_DIR, "
                             "CHECKPOINT or CHECKPOINT+LORA")
        first, _, second = source.partition("+")
        gt = first == "ground-truth"
        row = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, name), "ground_truth": gt,
                                    "through_vae": second or None if gt else None,
                                    "checkpoint": None if gt else first, "lora": None if gt else second or None})
        todo[name] = row
    for name, m in zip(todo, _run_rows(list(todo.values()), device, args.jobs)):
        rows[name] = m
        lines.append(f"| {name} | {m['mrc_mean']:.3f} ± {m['mrc_std']:.3f} | {m.get('fidelity_mean', float('nan')):.3f} "
                     f"| {m.get('size_spread', float('nan')):.3f} | {m['diversity']:.3f} |")
    lines += [_group_line(g, [m for n, m in rows.items() if n.split("/")[0] == g])
              for g in dict.fromkeys(n.split("/")[0] for n in rows if "/" in n)]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _run_rows(rows, device, jobs):
    # --jobs N: rows in N worker processes that split the CPU's threads: the tiny UNet's kernels scale badly over
    # threads, so N rows on fewer threads each finish sooner than one row after the other on all of them.
    if jobs <= 1:
        return [evaluate(row, device) for row in rows]
    if device.type != "cpu":
        raise ValueError(f"--jobs {jobs}: parallel rows are for the CPU (device {device}); use --jobs 1")
    # Longest first: sampled rows cost more than ground-truth rows, which then fill the last gap.
    order = sorted(range(len(rows)), key=lambda i: rows[i].ground_truth)
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        done = dict(zip(order, pool.map(evaluate, [rows[i] for i in order], [device] * len(rows))))
    return [done[i] for i in range(len(rows))]


def _group_line(group, metrics):
    # mean ± std (over runs: seeds of one setting) of each row's mean metric
    def stat(key):
        x = torch.tensor([m.get(key, float("nan")) for m in metrics], dtype=torch.float64)
        return f"{x.mean().item():.3f} ± {x.std().item() if len(x) > 1 else 0.0:.3f}"
    return (f"| **{group}** ({len(metrics)} runs: mean ± std over runs) | {stat('mrc_mean')} "
            f"| {stat('fidelity_mean')} | {stat('size_spread')} | {stat('diversity')} |")


# ----------------------------------------------------------------------------------------------
# Robustness of MRC (Carve3D Sec. 3, "controlled inconsistency"): distort one of 4 consistent views by
# an increasing amount; a good inconsistency metric rises monotonically with the amount.

@torch.no_grad()
def robustness(args, device):
    prompts = load_prompts(args.prompts, args.num_prompts)
    reward_fn, _ = build_reward(args, device)
    objs = torch.stack([world.make_object(p, make_generator("cpu", args.seed, "object", i, 0))
                        for i, p in enumerate(prompts)])
    views = world.render_views(objs.to(device), args.elevation)
    levels = list(range(args.levels + 1))
    table = {}
    for kind in world.DISTORTIONS:
        row = []
        for level in levels:
            distorted = views.clone()
            for i in range(len(prompts)):   # distort MVDream view 1 of every object
                g = make_generator("cpu", args.seed, "distortion", i)
                distorted[i, 1] = world.distort_view(views[i, 1], kind, level, g)
            row.append(reward_fn(distorted)["mrc"].mean().item())
        table[kind] = row
    monotone = {k: all(b > a for a, b in zip(v, v[1:])) for k, v in table.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump({"levels": levels, "mrc": table, "monotone": monotone, "num_objects": len(prompts)}, f, indent=1)
    lines = ["| distortion | " + " | ".join(f"level {lv}" for lv in levels) + " | monotone |",
             "| --- |" + " --- |" * (len(levels) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {monotone[k]} |" for k, v in table.items()]
    with open(os.path.join(args.out, "robustness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    line_plot(os.path.join(args.out, "robustness.png"), levels, table, "distortion level of view 1", "MRC (LPIPS)",
              title=f"MRC of {len(prompts)} ground-truth objects, one view distorted")
    print("\n".join(lines))
    return table, monotone


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="MVDream checkpoint: our toy folder, an MVDream file/folder or hub id")
    what.add_argument("--ground-truth", action="store_true", help="evaluate the toy world's ground-truth renders")
    what.add_argument("--robustness", action="store_true", help="MRC under controlled inconsistency (toy world)")
    what.add_argument("--table", nargs="+", metavar="NAME=SOURCE", help="several rows on identical noise "
                      "(--jobs: rows in parallel): SOURCE = ground-truth, ground-truth+VAE_DIR, CHECKPOINT or "
                      "CHECKPOINT+LORA; rows named GROUP/RUN also get a mean ± std line per GROUP")
    p.add_argument("--through-vae", metavar="DIR", help="with --ground-truth: pass the renders through this toy "
                   "VAE (AutoencoderKL folder), as a latent model sees its data")
    p.add_argument("--lora", help="LoRA weights to add (a train.py checkpoint dir or pytorch_lora_weights.safetensors)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and grid.png")
    p.add_argument("--prompts", default="toy:test", help="toy:test, toy:train, or a text file (one prompt per line)")
    p.add_argument("--num-prompts", type=int, default=32, help="number of prompts (0 = all)")
    p.add_argument("--seeds", type=int, default=2, help="samples per prompt (>= 2 for diversity)")
    add_sampling_args(p)
    add_reward_args(p)
    p.add_argument("--lpips-size", type=int, default=0, help="MRC crop size for LPIPS (0 = view resolution)")
    p.add_argument("--levels", type=int, default=4, help="robustness: distortion levels after 0")
    p.add_argument("--batch-size", type=int, default=16, help="objects per sampling / reward batch")
    p.add_argument("--jobs", type=int, default=1, help="--table on the CPU: rows evaluated in this many processes "
                   "at once, splitting the threads (e.g. 2 on a 2-core CPU)")
    p.add_argument("--orbit", type=int, default=0, help="write orbit/NN_<prompt>.ply and .gif for the first N prompts")
    p.add_argument("--orbit-size", type=int, default=ORBIT_SIZE, help="orbit GIF frame size in pixels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (rows evaluated at once), got {args.jobs}")
    if args.robustness or args.table:
        return robustness(args, device) if args.robustness else table(args, device)
    if args.through_vae and not args.ground_truth:
        raise ValueError("--through-vae applies to --ground-truth only (a checkpoint decodes with its own VAE)")
    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    if args.orbit < 0:
        raise ValueError("--orbit must be >= 0 (number of prompts to export in 3D)")
    metrics = evaluate(args, device)
    print(json.dumps({k: v for k, v in metrics.items() if k != "options"}, indent=1))


if __name__ == "__main__":
    main()
