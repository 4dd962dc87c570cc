"""Evaluate a multi-view diffusion checkpoint: MRC (Carve3D Sec. 3), prompt fidelity, diversity.

    python evaluate.py --checkpoint checkpoints/toy/sft-base --out outputs/eval/sft-base
    python evaluate.py --checkpoint checkpoints/toy/sft-base --lora runs/toy/checkpoints/epoch_0039 --out outputs/eval/rl
    python evaluate.py --ground-truth --out outputs/eval/gt          # the toy world's own renders
    python evaluate.py --ground-truth --through-vae checkpoints/toy/vae-tiny --out outputs/eval/gt-vae
    python evaluate.py --robustness --out outputs/eval/robustness    # MRC under controlled inconsistency
    python evaluate.py --bf16 --jobs 2 --num-prompts 64 --seeds 4 --out outputs/eval/table --table gt=ground-truth \
        gt-vae=ground-truth+checkpoints/toy/vae-tiny sft-base=checkpoints/toy/sft-base \
        sft-long=checkpoints/toy/sft-long rl-cpu=checkpoints/toy/sft-base+checkpoints/toy/rl-cpu \
        --gap sft-base,gt-vae --compare sft-long  # README table, with bootstrap intervals and size-adjusted MRC

Every prompt gets --seeds samples from fixed initial noise (seeded by prompt index and sample index), so
two checkpoints are compared on identical noise, as Carve3D compares base and finetuned models (Fig. 3).
  MRC        mean/std over samples of the MRC reward's LPIPS (lower = more consistent).
  fidelity   toy world only: fidelity.fidelity, whether each view shows the prompt's main object (colour,
             size, shape) and its part (colour, size, shape, side; hidden where ground truth hides it) and
             nothing else, against ground-truth renders of the prompt at that camera (1 = matches, 0 = empty
             or wrong main colour; formula at the top of toy/fidelity.py).
  size_spread toy world only: fidelity.size_spread, how much the main object's size changes from view to view
             (0 for one object; ~0.25 for 4 independent instances), an inconsistency that needs no LGM.
  size_bias  toy world only: fidelity.size_bias, the mean over views of log(main object's area / ground truth's):
             how much larger than ground truth the model draws (an object f times larger in 3D: ~2 log f).
  mrc_size_adjusted  toy world only: MRC minus ground truth's MRC at the model's size. An MRC can change with
             the size a perfectly consistent object is drawn at (Carve3D's settings on the toy did:
             docs/RESULTS.md), so a model could lower it by drawing smaller objects. The reference
             (size_reference.json): the evaluated prompts' ground-truth objects, with the same seeds, scaled in
             3D by --scales, through --reference-vae, scored by the same reward, with the size bias that
             fidelity.size_bias measures on them; MRC_gt is interpolated linearly in the linear
             scale exp(size_bias / 2), at the model's exp(size_bias / 2) (past the measured sizes along the end
             segments). 0 = as consistent as ground truth drawn at that size. --no-size-adjust skips it.
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

--table also writes table.json and, in table.md, 95% paired-bootstrap intervals over prompts (--bootstrap
resamples of the prompts from a fixed seed, the same prompt indices for every row, so differences between rows are
paired) for MRC, size-adjusted MRC, fidelity, size bias, size spread and diversity; with --gap BASE,REF the
fraction of the MRC gap between two rows that a row closes, (MRC_BASE - MRC_row) / (MRC_BASE - MRC_REF), the same
on size-adjusted MRC, and each row's diversity as a fraction of BASE's; with --compare
NAME each row's size-adjusted MRC minus NAME's. The reference curve is computed once (OUT/size_reference.json).

--robustness: Carve3D Sec. 3's controlled inconsistency on ground-truth renders, on raw renders and through
--through-vae (default the toy VAE; none = raw only): view 1 distorted by levels 0..--levels (world.DISTORTIONS;
MRC must rise with the level), "consistent scale" (the whole object scaled in 3D by --scales, all views alike: a
consistency metric stays flat) and "one view's scale" (view 1's object alone scaled: MRC must rise with
|log scale|). Writes robustness.json, robustness.md (a table per setting with the verdicts) and robustness.png
(a row of two panels per setting: the distortions by level, the scale rows by factor).
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
from support.diversity import per_prompt_diversity
from support.images import draw_lines, new_figure, save_grid
from support.mvdream_weights import read_vae
from support.seeding import make_generator
from support.stats import bootstrap_indices, interp_linear, percentile_ci
from toy import world
from toy.fidelity import fidelity_and_size, size_bias
from toy.prompts import load_prompts
from view3d import ORBIT_SIZE, export_object, slug


REFERENCE_VAE = "checkpoints/toy/vae-tiny"  # the toy policy's VAE: ground truth as a latent model can draw it
SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)          # object sizes of the size reference and the robustness scale rows
BOOTSTRAP_SEED = 0


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


def load_vae(vae_dir, device):
    return read_vae(vae_dir).to(device).eval()


@torch.no_grad()
def vae_roundtrip(views, vae, device):
    # views through the toy VAE (world.vae_roundtrip); vae: an AutoencoderKL or its folder
    return world.vae_roundtrip(load_vae(vae, device) if isinstance(vae, (str, os.PathLike)) else vae, views)


def build_reward(args, device):
    lgm = LGM.from_pretrained(args.lgm, config=args.lgm_config).to(device).eval().requires_grad_(False)
    lpips_model = load_lpips("alex").to(device)
    return MRCReward(lgm, lpips_model, elevation=args.elevation, lpips_size=args.lpips_size or None,
                     fg_threshold=args.mrc_fg_threshold, object_size=args.mrc_object_size), lpips_model


def score(views, reward_fn, batch_size, device):
    """(N, 4, 3, H, W) -> (N,) MRC on the CPU, batch by batch (the same batches for a row and its size reference)."""
    with autocast(device):
        return torch.cat([reward_fn(views[i:i + batch_size])["mrc"].float().cpu()  # on the CPU, as fidelity
                          for i in range(0, len(views), batch_size)])


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
    mrc = score(flat, reward_fn, args.batch_size, device)
    div = per_prompt_diversity(views, lpips_model)                            # (P,), nan for one sample
    metrics = {"num_prompts": len(prompts), "samples_per_prompt": args.seeds,
               "mrc_mean": mrc.mean().item(), "mrc_std": mrc.std().item() if len(mrc) > 1 else 0.0,
               "diversity": div.mean().item(), "per_sample": {"mrc": mrc.tolist()},
               "per_prompt": {"diversity": div.tolist()} if args.seeds > 1 else {}}
    if args.prompts.startswith("toy:"):
        per_sample = [p for p in prompts for _ in range(args.seeds)]
        fid, spread, bias = fidelity_and_size(flat.cpu(), per_sample, args.elevation)
        metrics.update(fidelity_mean=fid.mean().item(), fidelity_std=fid.std().item() if len(fid) > 1 else 0.0,
                       size_spread=spread.mean().item(), size_bias=bias.mean().item(),
                       mrc_vs_spread=within_prompt_corr(mrc.view(len(prompts), -1), spread.view(len(prompts), -1)),
                       per_sample={"mrc": mrc.tolist(), "fidelity": fid.tolist(), "size_spread": spread.tolist(),
                                   "size_bias": bias.tolist()})
        ref = getattr(args, "size_reference", None)   # --table passes the one it computed for every row
        if ref is None and not args.no_size_adjust:
            ref = size_reference(args, prompts, reward_fn, device)
        if ref is not None:
            adjusted, scale, at = size_adjusted_mrc(per_prompt(mrc, len(prompts)), per_prompt(bias, len(prompts)),
                                                    torch.tensor(ref["mrc"]), torch.tensor(ref["size_bias"]))
            metrics.update(mrc_size_adjusted=adjusted.item(), size_scale=scale.item(), size_reference_mrc=at.item())
    metrics["source"] = ({"ground_truth": True, "through_vae": args.through_vae} if args.ground_truth
                         else {"checkpoint": args.checkpoint, "lora": args.lora})
    metrics["options"] = {k: v for k, v in vars(args).items() if k not in ("out", "size_reference")}
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


# ----------------------------------------------------------------------------------------------
# Size: an MRC can change with the size a perfectly consistent object is drawn at, so a model's MRC is compared
# with ground truth's at the model's size (the module docstring's mrc_size_adjusted).

def per_prompt(values, num_prompts):
    """(P * S,) per-sample values -> (P,) per-prompt means in float64 (what the bootstrap resamples)."""
    return torch.as_tensor(values, dtype=torch.float64).view(num_prompts, -1).mean(1)


def size_adjusted_mrc(mrc, bias, ref_mrc, ref_bias):
    """MRC minus ground truth's MRC at the model's size -> (adjusted, the model's linear scale, MRC_gt there).
    mrc, bias (..., P): per-prompt means of a row; ref_mrc, ref_bias (..., P, K): the size reference per prompt
    at its K scales. Averaged over the prompts first, then interpolated, in the linear scale exp(size bias / 2)
    (areas go with the square of it); the reference's scales are its measured ones, so the measurement's own
    offset (ground truth at scale 1 does not measure exactly 0) cancels."""
    scale = (bias.mean(-1) / 2).exp()
    at = interp_linear(scale, (ref_bias.mean(-2) / 2).exp(), ref_mrc.mean(-2))
    return mrc.mean(-1) - at, scale, at


@torch.no_grad()
def size_reference(args, prompts, reward_fn, device):
    """Ground truth at other sizes on the evaluated prompts and noise: the objects of --ground-truth (same seeds)
    scaled in 3D by each of --scales, through --reference-vae, scored by this reward -> {"scales", "mrc",
    "size_bias"}, the last two (P, K) lists of per-prompt means over the seeds. Cached in OUT/size_reference.json
    under everything it depends on."""
    key = {"prompts": prompts, "seeds": args.seeds, "seed": args.seed, "elevation": args.elevation,
           "scales": list(args.scales), "reference_vae": args.reference_vae, "lgm": args.lgm,
           "lgm_config": args.lgm_config, "lpips_size": args.lpips_size, "batch_size": args.batch_size,
           "mrc_fg_threshold": args.mrc_fg_threshold, "mrc_object_size": args.mrc_object_size}
    path = os.path.join(args.out, "size_reference.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    vae, per_sample = load_vae(args.reference_vae, device), [p for p in prompts for _ in range(args.seeds)]
    mrc, bias = [], []
    for f in args.scales:
        views = world.ground_truth_views(prompts, args.seeds, args.seed, args.elevation, device, scale=f)
        flat = vae_roundtrip(views, vae, device).flatten(0, 1)
        mrc.append(per_prompt(score(flat, reward_fn, args.batch_size, device), len(prompts)))
        bias.append(per_prompt(size_bias(flat.cpu(), per_sample, args.elevation), len(prompts)))
    ref = {"key": key, "scales": list(args.scales), "mrc": torch.stack(mrc, 1).tolist(),
           "size_bias": torch.stack(bias, 1).tolist()}
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)
    return ref


# ----------------------------------------------------------------------------------------------
# Tables: several rows on the same prompts and noise, with paired bootstrap intervals over prompts.

def table(args, device):
    # --table NAME=SOURCE ...: every row on the same prompts and noise (--jobs N: N rows at a time); writes
    # table.md, table.json and NAME/metrics.json. SOURCE: ground-truth, ground-truth+VAE_DIR, CHECKPOINT or
    # CHECKPOINT+LORA. Rows named GROUP/RUN (e.g. kl/1 kl/2 kl/3: one training setting, three seeds) also get a
    # line GROUP: mean ± std over runs.
    if args.jobs > 1 and device.type != "cpu":
        raise ValueError(f"--jobs {args.jobs}: parallel rows are for the CPU (device {device}); use --jobs 1")
    todo = {}
    for row_arg in args.table:
        name, sep, source = row_arg.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--table {row_arg!r}: write NAME=SOURCE, SOURCE being ground-truth, ground-truth+VAE_DIR, "
                             "CHECKPOINT or CHECKPOINT+LORA")
        first, _, second = source.partition("+")
        gt = first == "ground-truth"
        todo[name] = argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, name), "ground_truth": gt,
                                           "through_vae": second or None if gt else None,
                                           "checkpoint": None if gt else first, "lora": None if gt else second or None})
    gap = args.gap.split(",") if args.gap else None
    for name in (gap or []) + ([args.compare] if args.compare else []):
        if name not in todo:
            raise ValueError(f"--gap/--compare name {name!r} is not a row of --table (rows: {', '.join(todo)})")
    if gap and len(gap) != 2:
        raise ValueError(f"--gap {args.gap!r}: write BASE,REF, two row names")
    ref = None
    if args.prompts.startswith("toy:") and not args.no_size_adjust:   # one reference for every row
        prompts = load_prompts(args.prompts, args.num_prompts)
        ref = size_reference(args, prompts, build_reward(args, device)[0], device)
    for row in todo.values():
        row.size_reference, row.no_size_adjust = ref, True
    rows = dict(zip(todo, _run_rows(list(todo.values()), device, args.jobs)))
    summary = summarize(rows, ref, gap, args.compare, args.bootstrap)
    columns = _columns(gap, args.compare)
    lines = ["| model | " + " | ".join(c[0] for c in columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_cell(s, c[1]) for c in columns) + " |" for name, s in summary.items()]
    lines += [_group_line(g, [s for n, s in summary.items() if n.split("/")[0] == g], columns)
              for g in dict.fromkeys(n.split("/")[0] for n in rows if "/" in n)]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"rows": summary, "gap": gap, "compare": args.compare, "size_reference": ref and
                   os.path.join(args.out, "size_reference.json"), "bootstrap": {
                       "resamples": args.bootstrap, "seed": BOOTSTRAP_SEED, "over": "prompts", "paired": True,
                       "interval": "95% percentile"}}, f, indent=1)
    print("\n".join(lines))
    return rows


def summarize(rows, ref, gap, compare, resamples):
    """Each row's point values and 95% percentile intervals from a paired bootstrap over prompts: the same
    resampled prompt indices for every row (and the size reference), so a difference between rows keeps its
    pairing. Keys: mrc, mrc_size_adjusted, fidelity, size_bias, size_spread, diversity, gap_closed,
    gap_closed_size_adjusted and diversity_ratio (to the gap's base row; with --gap), mrc_minus_compare and
    mrc_size_adjusted_minus_compare (with --compare), each with KEY_ci where a row has what it needs."""
    p = next(iter(rows.values()))["num_prompts"]
    both = torch.cat([torch.arange(p)[None], bootstrap_indices(p, resamples, BOOTSTRAP_SEED)])  # 0: all prompts
    stats = {}
    for name, m in rows.items():
        per = {k: per_prompt(v, p)[both] for k, v in m["per_sample"].items()}
        per.update({k: torch.tensor(v, dtype=torch.float64)[both] for k, v in m.get("per_prompt", {}).items()})
        stats[name] = {k: per[k].mean(1) for k in ("mrc", "fidelity", "size_bias", "size_spread", "diversity")
                       if k in per}
        if ref is not None:
            stats[name]["mrc_size_adjusted"] = size_adjusted_mrc(
                per["mrc"], per["size_bias"], torch.tensor(ref["mrc"], dtype=torch.float64)[both],
                torch.tensor(ref["size_bias"], dtype=torch.float64)[both])[0]
    for name, st in stats.items():
        for key in [k for k in ("mrc", "mrc_size_adjusted") if k in st]:
            suffix = key[3:]
            if gap:
                base, end = stats[gap[0]][key], stats[gap[1]][key]
                st["gap_closed" + suffix] = (base - st[key]) / (base - end)
            if compare:
                st[key + "_minus_compare"] = st[key] - stats[compare][key]
        if gap and "diversity" in st and "diversity" in stats[gap[0]]:   # Carve3D: RL keeps the base's diversity
            st["diversity_ratio"] = st["diversity"] / stats[gap[0]]["diversity"]
    summary = {}
    for name, st in stats.items():   # rows without the per-prompt values keep their points
        summary[name] = {k: rows[name][k] for k in ("size_bias", "size_spread", "diversity")
                         if k in rows[name] and k not in st}
        for key, x in st.items():
            summary[name].update({key: x[0].item(), key + "_ci": percentile_ci(x[1:])})
    return summary


def _columns(gap, compare):
    # (header, summary key) of table.md
    cols = [("MRC [95% CI]", "mrc"), ("size-adj MRC [CI]", "mrc_size_adjusted")]
    if gap:
        cols += [(f"gap closed {gap[0]}→{gap[1]} [CI]", "gap_closed"), ("size-adj gap closed [CI]",
                                                                           "gap_closed_size_adjusted")]
    if compare:
        cols += [(f"size-adj MRC − {compare} [CI]", "mrc_size_adjusted_minus_compare")]
    cols += [("fidelity [CI]", "fidelity"), ("size bias [CI]", "size_bias"), ("size spread [CI]", "size_spread"),
             ("diversity [CI]", "diversity")]
    return cols + [(f"diversity / {gap[0]} [CI]", "diversity_ratio")] if gap else cols


def _cell(summary, key):
    if key not in summary:
        return "–"
    if key + "_ci" not in summary:
        return f"{summary[key]:.3f}"
    lo, hi = summary[key + "_ci"]
    return f"{summary[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _run_rows(rows, device, jobs):
    # --jobs N: rows in N worker processes that split the CPU's threads: the tiny UNet's kernels scale badly over
    # threads, so N rows on fewer threads each finish sooner than one row after the other on all of them.
    if jobs <= 1:
        return [evaluate(row, device) for row in rows]
    # Longest first: sampled rows cost more than ground-truth rows, which then fill the last gap.
    order = sorted(range(len(rows)), key=lambda i: rows[i].ground_truth)
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        done = dict(zip(order, pool.map(evaluate, [rows[i] for i in order], [device] * len(rows))))
    return [done[i] for i in range(len(rows))]


def _group_line(group, summaries, columns):
    # mean ± std (over runs: seeds of one setting) of each row's point value
    def stat(key):
        x = torch.tensor([s.get(key, float("nan")) for s in summaries], dtype=torch.float64)
        return f"{x.mean().item():.3f} ± {x.std().item() if len(x) > 1 else 0.0:.3f}"
    return (f"| **{group}** ({len(summaries)} runs: mean ± std over runs) | "
            + " | ".join(stat(key) for _, key in columns) + " |")


# ----------------------------------------------------------------------------------------------
# Robustness of MRC (Carve3D Sec. 3, "controlled inconsistency"): distort one of 4 consistent views by
# an increasing amount; a good inconsistency metric rises monotonically with the amount. Scale rows: the toy's
# MRC must not pay for the size of a consistent object ("consistent scale" stays flat) but must see one view
# drawn at another size ("one view's scale" rises with |log scale|).
CONSISTENT, ONE_VIEW = "consistent scale", "one view's scale"
FLAT_TOLERANCE = 0.10   # "consistent scale" is flat when every value is within 10% of its value at scale 1


@torch.no_grad()
def robustness(args, device):
    prompts = load_prompts(args.prompts, args.num_prompts)
    if 1.0 not in args.scales:
        raise ValueError(f"--scales must include 1.0 (the undistorted object), got {args.scales}")
    reward_fn, _ = build_reward(args, device)
    objs = torch.stack([world.make_object(p, make_generator("cpu", args.seed, "object", i, 0))
                        for i, p in enumerate(prompts)])
    vae_dir = args.through_vae or REFERENCE_VAE
    settings = {"raw": None, **({} if vae_dir == "none" else {"vae": load_vae(vae_dir, device)})}
    mrc = {s: {} for s in settings}
    for row, views in _controlled_views(objs, args, device):
        for setting, vae in settings.items():
            seen = views if vae is None else vae_roundtrip(views, vae, device)
            mrc[setting].setdefault(row, []).append(reward_fn(seen)["mrc"].mean().item())
    levels, scales = list(range(args.levels + 1)), list(args.scales)
    result = {"levels": levels, "scales": scales, "num_objects": len(prompts), "through_vae": vae_dir,
              **{s: {"mrc": rows, **_verdicts(rows, scales)} for s, rows in mrc.items()}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "robustness.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [line for setting in settings for line in _robustness_table(result, setting) + [""]]
    _robustness_figure(os.path.join(args.out, "robustness.png"), result, settings)
    with open(os.path.join(args.out, "robustness.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return result


def _controlled_views(objs, args, device):
    # (row name, (B, 4, 3, H, W) views) for each column of each row, in column order
    views = world.render_views(objs.to(device), args.elevation)
    for kind in world.DISTORTIONS:
        for level in range(args.levels + 1):
            distorted = views.clone()
            for i in range(len(objs)):   # distort MVDream view 1 of every object
                g = make_generator("cpu", args.seed, "distortion", i)
                distorted[i, 1] = world.distort_view(views[i, 1], kind, level, g)
            yield kind, distorted
    scaled = [world.render_views(world.scale_object(objs, f).to(device), args.elevation) for f in args.scales]
    for s in scaled:
        yield CONSISTENT, s
    for s in scaled:                     # view 1 of the object scaled in 3D, the other views as they were
        one = views.clone()
        one[:, 1] = s[:, 1]
        yield ONE_VIEW, one


def _verdicts(rows, scales):
    # monotone distortion rows; the consistent-scale row's largest relative deviation from its value at 1.0;
    # the one-view row rising ring by ring away from 1.0 (0.8 and 1.2 above 0.9 and 1.1, above 1.0)
    at = scales.index(1.0)
    flat = rows[CONSISTENT]
    deviation = max(abs(v / flat[at] - 1) for v in flat)
    one = rows[ONE_VIEW]
    rings = [[one[i] for i in (at - k, at + k) if 0 <= i < len(one)] for k in range(max(at, len(one) - at - 1) + 1)]
    return {"monotone": {k: all(b > a for a, b in zip(rows[k], rows[k][1:])) for k in world.DISTORTIONS},
            "consistent_scale_max_deviation": deviation, "consistent_scale_flat": deviation <= FLAT_TOLERANCE,
            "one_view_rises": all(min(r) > max(q) for q, r in zip(rings, rings[1:]))}


def _robustness_figure(path, result, settings):
    # one row of panels per setting (raw, through the VAE): the distortions of view 1 by level, and the two scale
    # rows by factor, which a consistency metric keeps flat (consistent) and raises away from 1 (one view)
    fig = new_figure(900, 330 * len(settings))
    names = {"raw": "raw renders", "vae": "through the VAE"}
    for i, setting in enumerate(settings):
        rows = result[setting]["mrc"]
        draw_lines(fig.add_subplot(len(settings), 2, 2 * i + 1), result["levels"],
                   {k: rows[k] for k in world.DISTORTIONS}, "distortion level of view 1", "MRC",
                   f"{names[setting]}: one view distorted")
        draw_lines(fig.add_subplot(len(settings), 2, 2 * i + 2), result["scales"],
                   {k: rows[k] for k in (CONSISTENT, ONE_VIEW)}, "object scale (in 3D)", "MRC",
                   f"{names[setting]}: object size")
    fig.savefig(path, dpi=100)
    return fig


def _robustness_table(result, setting):
    r, levels, scales = result[setting], result["levels"], result["scales"]
    n = max(len(levels), len(scales))
    head = [" · ".join(x for x in (f"level {levels[i]}" if i < len(levels) else "",
                                   f"×{scales[i]}" if i < len(scales) else "") if x) for i in range(n)]
    name = {"raw": "raw renders", "vae": f"through the VAE ({result['through_vae']})"}[setting]
    lines = [f"MRC of {result['num_objects']} ground-truth objects, {name}", "",
             "| row | " + " | ".join(head) + " | check |", "| --- |" + " --- |" * (n + 1)]
    verdict = {k: f"monotone: {'yes' if r['monotone'][k] else 'NO'}" for k in world.DISTORTIONS}
    verdict[CONSISTENT] = (f"flat (±{FLAT_TOLERANCE:.0%}): {'yes' if r['consistent_scale_flat'] else 'NO'}, "
                           f"max deviation {r['consistent_scale_max_deviation']:.1%}")
    verdict[ONE_VIEW] = f"rises with abs(log scale): {'yes' if r['one_view_rises'] else 'NO'}"
    for row, values in r["mrc"].items():
        cells = [f"{v:.4f}" for v in values] + [""] * (n - len(values))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {verdict[row]} |")
    return lines


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
                   "VAE (AutoencoderKL folder), as a latent model sees its data; with --robustness: the second "
                   f"setting (default {REFERENCE_VAE}; none = raw renders only)")
    p.add_argument("--lora", help="LoRA weights to add (a train.py checkpoint dir or pytorch_lora_weights.safetensors)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and grid.png")
    p.add_argument("--prompts", default="toy:test", help="toy:test, toy:train, or a text file (one prompt per line)")
    p.add_argument("--num-prompts", type=int, default=32, help="number of prompts (0 = all)")
    p.add_argument("--seeds", type=int, default=2, help="samples per prompt (>= 2 for diversity)")
    add_sampling_args(p)
    add_reward_args(p)
    p.add_argument("--lpips-size", type=int, default=0, help="MRC crop size for LPIPS (0 = view resolution)")
    p.add_argument("--levels", type=int, default=4, help="robustness: distortion levels after 0")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="object sizes (3D scale factors) "
                   "of the size reference and of the robustness scale rows (robustness: must include 1.0)")
    p.add_argument("--reference-vae", default=REFERENCE_VAE, metavar="DIR", help="toy prompts: the VAE that the "
                   "size reference's ground truth passes through (the right reference for a latent model)")
    p.add_argument("--no-size-adjust", action="store_true", help="toy prompts: skip the size reference and the "
                   "size-adjusted MRC")
    p.add_argument("--gap", metavar="BASE,REF", help="--table: also the fraction of the MRC gap from row BASE to "
                   "row REF that each row closes (e.g. sft-base,gt-vae), with bootstrap intervals")
    p.add_argument("--compare", metavar="NAME", help="--table: also each row's size-adjusted MRC minus row NAME's "
                   "(e.g. sft-long), with paired bootstrap intervals")
    p.add_argument("--bootstrap", type=int, default=1000, help="--table: bootstrap resamples of the prompts")
    p.add_argument("--batch-size", type=int, default=16, help="objects per sampling / reward batch")
    p.add_argument("--jobs", type=int, default=1, help="--table on the CPU: rows evaluated in this many processes "
                   "at once, splitting the threads (e.g. 2 on a 2-core CPU)")
    p.add_argument("--orbit", type=int, default=0, help="write orbit/NN_<prompt>.ply and .gif for the first N prompts")
    p.add_argument("--orbit-size", type=int, default=ORBIT_SIZE, help="orbit GIF frame size in pixels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (rows evaluated at once), got {args.jobs}")
    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1 (resamples of the prompts), got {args.bootstrap}")
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
