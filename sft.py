"""Supervised finetuning of the toy world's tiny MVDream and tiny LGM (the paper's "SFT" stage).

Carve3D starts RL from a multi-view diffusion model after a short SFT (Instant3D-10K) and compares with
the same SFT run continued longer (20K, 100K): longer SFT improves consistency but shifts the
distribution (Carve3D Sec. 1, Fig. 4). We reproduce that setting in the toy world (toy.py):

  * MVDream: noise-prediction loss on the 4 views of each object with text and camera conditioning and
    classifier-free-guidance dropout, as MVDream is trained; the tiny CLIP text encoder trains with it.
  * LGM: 4 input views -> Gaussians -> renders of the inputs and of extra views vs ground truth,
    MSE + LPIPS, as LGM trains (3DTopia/LGM core/options.py: num_views 8, 4 of them inputs, lambda_lpips 1).

Commands that reproduce the shipped checkpoints (seed 0, defaults otherwise; each directory's
sft_record.json / lgm-tiny.record.json holds the arguments, device and wall time of the run that made it):
    python sft.py mvdream --steps 14000 --snapshot 2500:checkpoints/toy/sft-base --out checkpoints/toy/sft-long
    python sft.py lgm --steps 3000 --out checkpoints/toy/lgm-tiny.safetensors
Run on one H200 (both at once): MVDream 11.8 min (sft-base after 2.1 min), LGM 15.2 min. sft-base is the RL
starting point; sft-long is the same run continued 5.6x longer (the "longer SFT" baseline).
A quick CPU smoke run: python sft.py mvdream --steps 20 --bank 64 --batch-size 8 --out outputs/sft-smoke
"""

import argparse
import copy
import json
import math
import os
import time
from multiprocessing import get_context

import torch
import torch.nn.functional as F
from tqdm import tqdm

import reconstruct
import toy
from mvdream import MVDreamPolicy
from reward import load_lpips
from sample import sample_trajectories
from support.devices import autocast
from support.images import save_grid
from support.prompts import load_prompts
from support.seeding import make_generator


# ----------------------------------------------------------------------------------------------
# Data: a bank of procedural objects (Gaussians) and their 4 standard views, made once per run.

def _object(args):
    torch.set_num_threads(1)  # many small workers, not many threads each
    seed, index, prompt = args
    return toy.make_object(prompt, make_generator("cpu", seed, "object", index))


def make_bank(n, seed, device, workers=0):
    """n objects cycling over the (shuffled) training prompts; object i depends only on (seed, i)."""
    prompts = load_prompts("toy:train")
    order = torch.randperm(len(prompts), generator=make_generator("cpu", seed, "bank")).tolist()
    jobs = [(seed, i, prompts[order[i % len(prompts)]]) for i in range(n)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            objects = pool.map(_object, jobs, chunksize=16)
    else:
        objects = [_object(j) for j in tqdm(jobs, desc="objects", leave=False)]
    gaussians = torch.stack(objects).to(device)
    views = torch.cat([toy.render_views(gaussians[i:i + 64]) for i in range(0, n, 64)])
    return {"prompts": [j[2] for j in jobs], "gaussians": gaussians, "views": views}


# ----------------------------------------------------------------------------------------------
# MVDream SFT

def train_mvdream(args, device):
    policy = MVDreamPolicy.tiny(toy.VOCAB, elevation=toy.TOY.elevation, seed=args.seed).to(device)
    policy.unet.requires_grad_(True)
    policy.text_encoder.requires_grad_(True)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    # Exponential moving average of the weights: what gets sampled and saved (standard for diffusion models;
    # the raw weights of a tiny pixel-space model leave visible high-frequency noise in its samples).
    ema = copy.deepcopy(policy).requires_grad_(False)
    bank = make_bank(args.bank, args.seed, device, args.workers)
    latents = policy.encode(bank["views"])                         # pixel-unshuffled 12x32x32 per view
    g = make_generator(device, args.seed, "sft-mvdream")
    sched = policy.scheduler
    alphas = sched.alphas_cumprod.to(device)
    snapshots = dict(s.split(":", 1) for s in args.snapshot)
    snapshots = {int(k): v for k, v in snapshots.items()}
    grid_prompts = load_prompts("toy:test", 4)
    print(f"tiny MVDream: {sum(p.numel() for p in params) / 1e6:.2f} M trainable params, bank {args.bank} objects")
    t0, log = time.time(), []
    for step in tqdm(range(1, args.steps + 1), desc="sft mvdream"):
        idx = torch.randint(len(bank["prompts"]), (args.batch_size,), generator=g, device=device)
        x0 = latents[idx]
        prompts = [bank["prompts"][i] for i in idx.tolist()]
        # CFG dropout: the empty prompt is the unconditional branch at sampling time (MVDream scripts/t2i.py).
        drop = torch.rand(args.batch_size, generator=g, device=device) < args.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        # One timestep per object, shared by its 4 views (the sampler denoises the views together).
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with autocast(device):
            emb = policy.text_encoder(policy.tokenize(prompts).to(device)).last_hidden_state
            eps = policy(xt, t, emb, guidance_scale=1.0)
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), policy.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0:
            log.append({"step": step, "loss": loss.item(), "time": time.time() - t0})
        if step % args.sample_every == 0 or step in snapshots or step == args.steps:
            ema.refresh_negative_embeds()  # the text encoder trained: re-encode the empty prompt
            traj = sample_trajectories(ema, grid_prompts, num_steps=20, guidance_scale=5.0, eta=1.0,
                                       generator=make_generator(device, args.seed, "grid"))
            save_grid(os.path.join(args.log_dir, f"mvdream_step{step:06d}.png"), traj["views"], grid_prompts)
            tqdm.write(f"step {step}: loss {loss.item():.4f}")
        if step in snapshots:
            _save_policy(ema, snapshots[step], args, step, time.time() - t0, log)
    _save_policy(ema, args.out, args, args.steps, time.time() - t0, log)


def lr_at(args, step):
    # linear warm-up, then cosine decay to 10% over the whole run (a snapshot is taken mid-decay)
    warm = min(1.0, step / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))


def _save_policy(policy, out, args, step, seconds, log):
    policy.refresh_negative_embeds()
    policy.save_pretrained(out)
    _write_record(os.path.join(out, "sft_record.json"), args, step, seconds, log)
    print(f"saved {out} at step {step} ({seconds / 60:.1f} min)")


def _write_record(path, args, step, seconds, log):
    # What reproduces a shipped checkpoint: the arguments (incl. seed), the step, wall time and device.
    record = {"args": vars(args), "step": step, "seconds": round(seconds, 1), "loss_log": log[-20:],
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------------------------
# LGM SFT

def train_lgm(args, device):
    lgm = reconstruct.LGM("tiny").to(device).train()
    lpips_model = load_lpips("alex").to(device)
    opt = torch.optim.AdamW(lgm.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    bank = make_bank(args.bank, args.seed, device, args.workers)
    g = make_generator("cpu", args.seed, "sft-lgm")
    cams_in = reconstruct.standard_cameras(-toy.TOY.elevation, toy.TOY.radius).to(device)
    res = toy.TOY.resolution
    print(f"tiny LGM: {sum(p.numel() for p in lgm.parameters()) / 1e6:.2f} M params, bank {args.bank} objects")
    t0, log = time.time(), []
    for step in tqdm(range(1, args.steps + 1), desc="sft lgm"):
        idx = torch.randint(args.bank, (args.batch_size,), generator=g)
        views = bank["views"][idx.to(device)][:, list(reconstruct.MVDREAM_TO_LGM)]   # LGM input order (LGM app.py)
        extra_c2w = torch.stack([toy.random_cameras(args.extra_views, g) for _ in range(args.batch_size)]).to(device)
        with torch.no_grad():
            extra = reconstruct.render_gaussians(bank["gaussians"][idx.to(device)], extra_c2w, toy.TOY.fovy, res, res)
        target = torch.cat([views, extra["image"]], 1)
        c2w = torch.cat([cams_in.expand(args.batch_size, -1, -1, -1), extra_c2w], 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with autocast(device):
            gaussians = lgm.reconstruct(views, cams_in)
        pred = reconstruct.render_gaussians(gaussians.float(), c2w, toy.TOY.fovy, res, res)["image"]
        mse = F.mse_loss(pred, target)
        lp = lpips_model(pred.flatten(0, 1), target.flatten(0, 1), normalize=True).mean()
        loss = mse + args.lambda_lpips * lp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lgm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            log.append({"step": step, "mse": mse.item(), "lpips": lp.item(), "time": time.time() - t0})
        if step % args.sample_every == 0 or step == args.steps:
            n = min(4, args.batch_size)
            save_grid(os.path.join(args.log_dir, f"lgm_step{step:06d}.png"),
                      torch.cat([target[:n, :4], pred[:n, :4].detach()], 0),
                      [f"target {i}" for i in range(n)] + [f"render {i}" for i in range(n)])
            tqdm.write(f"step {step}: mse {mse.item():.5f} lpips {lp.item():.4f}")
    lgm.eval()
    lgm.save_pretrained(args.out)
    _write_record(os.path.splitext(args.out)[0] + ".record.json", args, args.steps, time.time() - t0, log)
    print(f"saved {args.out} ({(time.time() - t0) / 60:.1f} min)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["mvdream", "lgm"], help="which toy model to train")
    p.add_argument("--out", required=True, help="output directory (mvdream) or .safetensors file (lgm)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--snapshot", action="append", default=[], metavar="STEP:DIR",
                   help="mvdream: also save the model at STEP into DIR (repeatable)")
    p.add_argument("--batch-size", type=int, default=None, help="objects per step (default 64 mvdream, 32 lgm)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 mvdream, 1e-3 lgm)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved MVDream weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of the empty prompt (mvdream)")
    p.add_argument("--extra-views", type=int, default=4, help="random supervision views per object (lgm)")
    p.add_argument("--lambda-lpips", type=float, default=1.0, help="LPIPS weight in the LGM loss")
    p.add_argument("--bank", type=int, default=8192, help="procedural objects generated for the run")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating objects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-every", type=int, default=1000, help="write a sample grid every N steps")
    p.add_argument("--log-dir", default="outputs/sft", help="where sample grids go")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (64 if args.model == "mvdream" else 32)
    args.lr = args.lr or (5e-4 if args.model == "mvdream" else 1e-3)
    os.makedirs(args.log_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    (train_mvdream if args.model == "mvdream" else train_lgm)(args, device)


if __name__ == "__main__":
    main()
