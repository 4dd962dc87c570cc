"""Supervised finetuning of the toy world's tiny VAE, tiny MVDream and tiny LGM (the paper's "SFT" stage).

Carve3D starts RL from a multi-view diffusion model after a short SFT (Instant3D-10K) and compares with
the same SFT run continued longer (20K, 100K): longer SFT improves consistency but shifts the
distribution (Carve3D Sec. 1, Fig. 4). We reproduce that setting in the toy world (toy/world.py):

  * VAE: diffusers' AutoencoderKL at toy size, L1 + LPIPS + a small KL (LDM's autoencoder losses, Rombach
    et al. 2022 Sec. 3, without the GAN), so MVDream is a latent model as the real one is.
  * MVDream: noise-prediction loss on the 4 views' latents with text and camera conditioning and
    classifier-free-guidance dropout, as MVDream is trained; the tiny CLIP text encoder trains with it.
    A documented fraction of the examples (--independent-fraction, 0.5) has 4 views that are NOT one object:
    each view comes from its own instance of the prompt, like the 2D images that MVDream learns from next to
    multi-view renders ("learning from both 2D and 3D data", Shi et al. 2024): no cross-view constraint.
    Each view alone still matches the prompt. This is why longer SFT cannot remove the model's
    inconsistency: it is in the data, not a sign of under-training.
  * LGM: 4 input views -> Gaussians -> renders of the inputs and of extra views vs ground truth,
    MSE + LPIPS, as LGM trains (3DTopia/LGM core/options.py: num_views 8, 4 of them inputs, lambda_lpips 1).

Commands that made the shipped checkpoints (seed 0 unless given; each checkpoint's record holds the arguments,
device and wall time of its run):
    python -m toy.sft vae --steps 2000 --bank 8192 --out checkpoints/toy/vae-tiny
    python -m toy.sft latents --vae checkpoints/toy/vae-tiny           # its latents_mean / scaling_factor, set after
                                                                      # the fact (a `vae` run sets them itself)
    python -m toy.sft lgm --steps 3000 --out lgm-tiny.safetensors      # the first LGM, not shipped (git: 533d5a0)
    python -m toy.sft lgm --init lgm-tiny.safetensors --lr 5e-4 --seed 1 --bank 8192 --steps 4000 --max-minutes 7.4 \
        --out lgm-tiny-v2.safetensors                                 # that LGM trained further (git: b7624da)
    python -m toy.sft lgm --init lgm-tiny-v2.safetensors --lr 5e-4 --seed 2 --bank 8192 --steps 1200 \
        --max-minutes 6.3 --workers 7 --scale-range 0.7 1.3 --vae-inputs checkpoints/toy/vae-tiny \
        --out checkpoints/toy/lgm-tiny-v3.safetensors                 # the reward model: sizes 0.7-1.3x, VAE inputs
    python -m toy.sft mvdream --bank 12288 --steps 20000 --compile reduce-overhead --state STATE --max-minutes M \
        --snapshot 3000:checkpoints/toy/sft-base --snapshot 15000:checkpoints/toy/sft-long --out outputs/sft-20000
sft-base is the RL starting point; sft-long is the same run 5x longer (the "longer SFT" baseline, as Carve3D's
10K -> 20K/100K). The cosine schedule spans --steps, so both are snapshots taken mid-decay.
A run longer than one GPU call: repeat the same command with --state FILE --max-minutes M; each call saves the
model at the step it reached and continues exactly where the previous one stopped (tests/test_toy_models.py).
The MVDream step is launch-bound on a GPU, hence the large default batch and `--compile reduce-overhead` (the
loss's forward and backward replayed as CUDA graphs).
A quick CPU smoke run: python -m toy.sft vae --steps 20 --bank 64 --batch-size 8 --out outputs/vae-smoke, then
    python -m toy.sft mvdream --vae outputs/vae-smoke --steps 20 --bank 64 --batch-size 8 --out outputs/sft-smoke
"""

import argparse
import copy
import json
import math
import os
import time
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

import reconstruct
from mvdream import TINY_VAE_CONFIG, MVDreamPolicy
from reward import load_lpips
from sample import alphas_cumprod_on, sample_trajectories
from support.devices import autocast
from support.files import read_or_explain
from support.mvdream_weights import read_vae
from support.images import save_grid
from support.seeding import make_generator
from toy import world
from toy.prompts import load_prompts


# ----------------------------------------------------------------------------------------------
# Data: a bank of procedural examples (Gaussians) and their 4 standard views, made once per run.

def _object(args):
    torch.set_num_threads(1)  # many small workers, not many threads each
    seed, index, instance, prompt = args
    # as numpy: tens of thousands of tensors sent back through a pool exhaust its file-descriptor sharing
    return world.make_object(prompt, make_generator("cpu", seed, "object", index, instance)).numpy()


def make_bank(n, seed, device, workers=0, independent_fraction=0.0):
    """n examples cycling over the (shuffled) training prompts; example i depends only on (seed, i).

    With probability independent_fraction an example's 4 views are not one object: view k is rendered from
    its own instance k of the prompt (2D-image-like data, see the module docstring)."""
    prompts = load_prompts("toy:train")
    order = torch.randperm(len(prompts), generator=make_generator("cpu", seed, "bank")).tolist()
    coin = torch.rand(n, generator=make_generator("cpu", seed, "independent"))
    independent = (coin < independent_fraction).tolist()
    jobs = [(seed, i, k, prompts[order[i % len(prompts)]]) for i in range(n)
            for k in range(4 if independent[i] else 1)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            objects = pool.map(_object, jobs, chunksize=16)
    else:
        objects = [_object(j) for j in tqdm(jobs, desc="objects", leave=False)]
    gaussians = torch.from_numpy(np.stack(objects)).to(device)
    chunk = 256 if gaussians.is_cuda else 64  # bounded memory; few launches on a GPU
    rendered = torch.cat([world.render_views(gaussians[i:i + chunk]) for i in range(0, len(jobs), chunk)])
    first = [j for j, job in enumerate(jobs) if job[2] == 0]  # instance 0 of every example
    views = rendered[first].clone()
    for i, j in enumerate(first):
        if independent[i]:
            views[i] = torch.stack([rendered[j + k, k] for k in range(4)])  # view k of instance k
    return {"prompts": [jobs[j][3] for j in first], "gaussians": gaussians[first], "views": views,
            "independent": torch.tensor(independent)}


# ----------------------------------------------------------------------------------------------
# VAE SFT

def train_vae(args, device):
    vae = AutoencoderKL(**TINY_VAE_CONFIG).to(device).train()
    lpips_model = load_lpips("alex").to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=1e-2)
    images = make_bank(args.bank, args.seed, device, args.workers)["views"].flatten(0, 1)  # (4n, 3, 64, 64)
    g = make_generator(device, args.seed, "sft-vae")
    print(f"tiny VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {len(images)} images")
    t0, log = time.time(), []
    for step in tqdm(range(1, args.steps + 1), desc="sft vae"):
        x = images[torch.randint(len(images), (args.batch_size,), generator=g, device=device)] * 2 - 1
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample.float()
        l1 = (recon - x).abs().mean()
        lp = lpips_model(recon.clamp(-1, 1), x).mean()  # lpips takes [-1, 1]
        # LDM weighs the KL 1e-6 against the per-image SUM of the reconstruction error; ours is a mean
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = l1 + args.lambda_lpips * lp + args.kl_weight * kl
        _optimize(opt, loss, vae.parameters())
        if step % 100 == 0:
            log.append({"step": step, "l1": l1.item(), "lpips": lp.item(), "time": time.time() - t0})
        if step % args.sample_every == 0 or step == args.steps:
            tqdm.write(f"step {step}: l1 {l1.item():.4f} lpips {lp.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    quality = _vae_quality(vae, images[:1024], device)
    vae.save_pretrained(args.out)
    _write_record(os.path.join(args.out, "sft_record.json"), args, args.steps, time.time() - t0, log, **quality)
    print(f"saved {args.out}: {quality}")


@torch.no_grad()
def normalize_latents(vae, images):
    """Set the VAE's latents_mean (per channel) to a white image's latent and scaling_factor so that the shifted
    latents of `images` have unit mean square: what MVDreamPolicy.encode/decode apply.

    Why the shift: the toy's views are mostly white background, whose latent is far from 0 (unshifted, about
    +1.3 per channel in units of the latents' std). SD's noise schedule keeps sqrt(alpha_bar) = 0.09 of the
    signal at the sampler's first step (t = 951; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"), so a model trained on such latents reads sampling's pure noise as missing background:
    sft-base trained that way drew objects 1.3x too large in area (size bias +0.21), and 0.02 when its
    sampler started from the background's signal instead. SD's own VAE has no latents_mean (its images have
    no common background): the paper setup is unchanged."""
    white = torch.ones(1, 3, *images.shape[-2:], device=images.device) * 2 - 1
    mean = vae.encode(white).latent_dist.mean.mean((0, 2, 3))
    z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in images.split(256)]) - mean.view(-1, 1, 1)
    vae.register_to_config(latents_mean=mean.tolist(), scaling_factor=float(z.pow(2).mean().rsqrt()))


@torch.no_grad()
def _vae_quality(vae, images, device):
    # White background must stay white: count pixels that are white (> 0.99) in the render but would be
    # foreground (< 0.95, the MRC crop and fidelity threshold) after a round trip.
    normalize_latents(vae, images)
    z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in images.split(256)])
    recon = torch.cat([vae.decode(c).sample for c in z.split(256)]).float().div(2).add(0.5).clamp(0, 1)
    white = (images > 0.99).all(1)
    stained = (recon < 0.95).any(1) & white
    return {"scaling_factor": vae.config.scaling_factor, "latents_mean": vae.config.latents_mean, "recon_l1": (recon - images).abs().mean().item(),
            "stained_background_fraction": (stained.sum() / white.sum()).item()}


# ----------------------------------------------------------------------------------------------
# MVDream SFT

def train_mvdream(args, device):
    policy = MVDreamPolicy.tiny(world.VOCAB, elevation=world.TOY.elevation, seed=args.seed,
                                vae=read_vae(args.vae)).to(device)
    policy.unet.requires_grad_(True)
    policy.text_encoder.requires_grad_(True)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2, fused=device.type == "cuda")
    # Exponential moving average of the weights: what gets sampled and saved (standard for diffusion models).
    ema = copy.deepcopy(policy).requires_grad_(False)
    ema_params = [q for q, p in zip(ema.parameters(), policy.parameters()) if p.requires_grad]
    bank = make_bank(args.bank, args.seed, device, args.workers, args.independent_fraction)
    latents = policy.encode(bank["views"])                                  # (n, 4 views, 4, 16, 16)
    ids = policy.tokenize(bank["prompts"]).to(device)
    empty = policy.tokenize([""]).to(device)
    loss_fn = torch.compile(_denoise_loss, mode=args.compile) if args.compile else _denoise_loss
    alphas = alphas_cumprod_on(policy.scheduler, device)  # on the device once (no host sync per step)
    g = make_generator(device, args.seed, "sft-mvdream")
    snapshots = {int(k): v for k, v in (s.split(":", 1) for s in args.snapshot)}
    print(f"tiny MVDream: {sum(p.numel() for p in params) / 1e6:.2f} M trainable params, bank {args.bank} examples, "
          f"{bank['independent'].float().mean():.2f} with independent views")
    start, seconds, log = _load_state(args, policy, ema, opt, g, latents)  # --state: continue a stopped run
    t0, step = time.time() - seconds, start  # t0: the run's start, counting earlier calls
    call_start = time.time()                 # --max-minutes counts this call only
    for step in tqdm(range(start + 1, args.steps + 1), desc="sft mvdream", initial=start, total=args.steps):
        idx = torch.randint(len(latents), (args.batch_size,), generator=g, device=device)
        # CFG dropout: the empty prompt is the unconditional branch at sampling time (MVDream scripts/t2i.py).
        drop = torch.rand(args.batch_size, 1, generator=g, device=device) < args.cfg_dropout
        # One timestep per object, shared by its 4 views (the sampler denoises the views together).
        t = torch.randint(0, 1000, (args.batch_size,), generator=g, device=device)  # the schedule's 1000 steps
        noise = torch.randn(latents[idx].shape, generator=g, device=device)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with autocast(device):
            loss = loss_fn(policy, alphas, latents[idx], torch.where(drop, empty, ids[idx]), t, noise)
        _optimize(opt, loss, params)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(args.ema, (1 + step) / (10 + step)))
        if step % 100 == 0:
            log.append({"step": step, "loss": loss.item(), "time": time.time() - t0})
        out_of_time = _out_of_time(args, call_start)
        if step % args.sample_every == 0 or step in snapshots or step == args.steps or out_of_time:
            _sample_grid(ema, args, step, device)
            tqdm.write(f"step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        if step in snapshots:
            _save_policy(ema, snapshots[step], args, step, time.time() - t0, log)
        if out_of_time:  # the final checkpoint is this step's (its record says which step it is)
            break
    _save_policy(ema, args.out, args, step, time.time() - t0, log)
    if args.state:
        _save_state(args, policy, ema, opt, g, latents, step, time.time() - t0, log)


# Exact resume across GPU calls (--state FILE): the raw and EMA weights, AdamW's moments, the generator, the step
# and the log, written atomically when a call stops (--max-minutes or the last step) and read by the next call
# with the same arguments, which continues as if never stopped (bit for bit on the CPU; on a GPU the remade bank's
# renders can differ in their last bits, as the rasterizer accumulates with atomic adds). The example bank is
# remade from the seed; a checksum of its latents guards against a bank that came out different.
SAME_FOR_RESUME = ("vae", "independent_fraction", "steps", "batch_size", "lr", "warmup", "ema", "cfg_dropout",
                   "bank", "seed")


def _load_state(args, policy, ema, opt, g, latents):
    if not args.state or not os.path.isfile(args.state):
        if args.state:
            print(f"no training state at {args.state}: starting a new run (saved there when this call stops)")
        return 0, 0.0, []
    with read_or_explain(args.state, "the training state of a toy/sft.py run (a torch checkpoint)",
                         "delete it to start the run over, or pass another --state"):
        state = torch.load(args.state, map_location="cpu", weights_only=False)
    changed = [f"{k} (saved {state['args'][k]!r}, now {getattr(args, k)!r})" for k in SAME_FOR_RESUME
               if state["args"][k] != getattr(args, k)]
    if changed:
        raise ValueError(f"--state {args.state}: the run was saved with other arguments: {', '.join(changed)}; "
                         "pass the saved values, or another --state file to start a new run")
    checksum, scale = _bank_checksum(latents)  # last-bit differences move the sum by ~1e-6 * sqrt(n) << 1e-6 * scale
    if abs(checksum - state["bank_checksum"]) > 1e-6 * scale:
        raise ValueError(f"--state {args.state}: the remade example bank differs from the saved run's (latent sum "
                         f"{checksum} vs {state['bank_checksum']}): toy/world.py, the VAE or the bank arguments changed")
    for model, saved in ((policy, state["model"]), (ema, state["ema"])):
        model.load_state_dict({**model.state_dict(), **saved})  # the frozen VAE comes from --vae
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    print(f"resumed {args.state} at step {state['step']} ({state['seconds'] / 60:.1f} min so far)")
    return state["step"], state["seconds"], state["log"]


def _trained(policy):
    # the state's weights: all but the frozen VAE's (--vae holds them), so that a state fits a device call's carry
    return {k: v for k, v in policy.state_dict().items() if not k.startswith("vae.")}


def _bank_checksum(latents):
    x = latents.double()
    return x.sum().item(), x.abs().sum().item()


def _save_state(args, policy, ema, opt, g, latents, step, seconds, log):
    state = {"args": vars(args), "step": step, "seconds": seconds, "log": log, "model": _trained(policy),
             "ema": _trained(ema), "optimizer": opt.state_dict(), "generator": g.get_state(),
             "bank_checksum": _bank_checksum(latents)[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.state)), exist_ok=True)
    torch.save(state, args.state + ".tmp")
    os.replace(args.state + ".tmp", args.state)  # atomic: a killed call leaves the previous state intact
    print(f"saved training state {args.state} at step {step}")


def _denoise_loss(policy, alphas, x0, ids, t, noise):
    a = alphas[t].view(-1, 1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    emb = policy.text_encoder(ids).last_hidden_state
    return F.mse_loss(policy(xt, t, emb, guidance_scale=1.0).float(), noise)


def _sample_grid(ema, args, step, device):
    ema.refresh_negative_embeds()  # the text encoder trained: re-encode the empty prompt
    prompts = load_prompts("toy:test", 4)
    traj = sample_trajectories(ema, prompts, num_steps=20, guidance_scale=5.0, eta=1.0,
                               generator=make_generator(device, args.seed, "grid"))
    save_grid(os.path.join(args.log_dir, f"mvdream_step{step:06d}.png"), traj["views"], prompts)


def _optimize(opt, loss, params):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def lr_at(args, step):
    # linear warm-up, then cosine decay to 10% over the whole run (a snapshot is taken mid-decay)
    warm = min(1.0, step / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))


def _save_policy(policy, out, args, step, seconds, log):
    policy.refresh_negative_embeds()
    policy.save_pretrained(out, dtype=torch.float16)  # fp16 storage: the shipped checkpoints stay small
    _write_record(os.path.join(out, "sft_record.json"), args, step, seconds, log)
    print(f"saved {out} at step {step} ({seconds / 60:.1f} min)")


def _out_of_time(args, t0):
    return args.max_minutes and time.time() - t0 > 60 * args.max_minutes  # --max-minutes (this call): stop and save


def _write_record(path, args, step, seconds, log, **extra):
    # What reproduces a shipped checkpoint: the arguments (incl. seed), the step, wall time and device.
    record = {"args": vars(args), "step": step, "seconds": round(seconds, 1), "loss_log": log[-20:],
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, **extra}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------------------------
# LGM SFT

def train_lgm(args, device):
    # --init: continue from a trained LGM (e.g. the shipped one), so that training can be split across GPU sessions
    lgm = (reconstruct.LGM.from_pretrained(args.init, config="tiny") if args.init else reconstruct.LGM("tiny"))
    lgm = lgm.to(device).train().requires_grad_(True)
    lpips_model = load_lpips("alex").to(device)
    opt = torch.optim.AdamW(lgm.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    bank = make_bank(args.bank, args.seed, device, args.workers)
    g = make_generator("cpu", args.seed, "sft-lgm")
    cams_in = reconstruct.standard_cameras(-world.TOY.elevation, world.TOY.radius).to(device)
    res = world.TOY.resolution
    vae = AutoencoderKL.from_pretrained(args.vae_inputs).to(device).eval() if args.vae_inputs else None
    print(f"tiny LGM: {sum(p.numel() for p in lgm.parameters()) / 1e6:.2f} M params, bank {args.bank} objects")
    t0, log = time.time(), []
    for step in tqdm(range(1, args.steps + 1), desc="sft lgm"):
        idx = torch.randint(args.bank, (args.batch_size,), generator=g)
        views, gaussians_gt = bank["views"][idx.to(device)], bank["gaussians"][idx.to(device)]
        extra_c2w = torch.stack([world.random_cameras(args.extra_views, g) for _ in range(args.batch_size)]).to(device)
        with torch.no_grad():
            if args.scale_range:  # objects of other sizes than the bank's, so that size alone costs no MRC
                f = torch.empty(args.batch_size).uniform_(*args.scale_range, generator=g).to(device)
                gaussians_gt = world.scale_object(gaussians_gt, f)
                views = world.render_views(gaussians_gt)
            views = views[:, list(reconstruct.MVDREAM_TO_LGM)]                       # LGM input order (LGM app.py)
            extra = reconstruct.render_gaussians(gaussians_gt, extra_c2w, world.TOY.fovy, res, res)
        target = torch.cat([views, extra["image"]], 1)
        if vae is not None:  # inputs as a latent model decodes them; the targets stay the renders
            with torch.no_grad():
                views = world.vae_roundtrip(vae, views)
        c2w = torch.cat([cams_in.expand(args.batch_size, -1, -1, -1), extra_c2w], 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        with autocast(device):
            gaussians = lgm.reconstruct(views, cams_in)
        pred = reconstruct.render_gaussians(gaussians.float(), c2w, world.TOY.fovy, res, res)["image"]
        mse = F.mse_loss(pred, target)
        lp = lpips_model(pred.flatten(0, 1), target.flatten(0, 1), normalize=True).mean()
        loss = mse + args.lambda_lpips * lp
        _optimize(opt, loss, lgm.parameters())
        if step % 100 == 0:
            log.append({"step": step, "mse": mse.item(), "lpips": lp.item(), "time": time.time() - t0})
        out_of_time = _out_of_time(args, t0)
        if step % args.sample_every == 0 or step == args.steps or out_of_time:
            n = min(4, args.batch_size)
            save_grid(os.path.join(args.log_dir, f"lgm_step{step:06d}.png"),
                      torch.cat([target[:n, :4], pred[:n, :4].detach()], 0),
                      [f"target {i}" for i in range(n)] + [f"render {i}" for i in range(n)])
            tqdm.write(f"step {step}: mse {mse.item():.5f} lpips {lp.item():.4f}")
        if out_of_time:  # the record says which step the saved model is
            break
    lgm.eval()
    lgm.save_pretrained(args.out)
    _write_record(os.path.splitext(args.out)[0] + ".record.json", args, step, time.time() - t0, log)
    print(f"saved {args.out} ({(time.time() - t0) / 60:.1f} min)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["vae", "mvdream", "lgm", "latents"],
                   help="which toy model to train (latents: set a trained VAE's latent normalisation in place)")
    p.add_argument("--out", help="output directory (vae, mvdream) or .safetensors file (lgm)")
    p.add_argument("--vae", default="checkpoints/toy/vae-tiny",
                   help="mvdream, latents: the trained toy VAE (toy/sft.py vae)")
    p.add_argument("--independent-fraction", type=float, default=0.5,
                   help="mvdream: fraction of examples whose 4 views come from 4 instances of the prompt")
    p.add_argument("--init", help="lgm: start from this LGM .safetensors instead of random weights")
    p.add_argument("--scale-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="lgm: scale each training object in 3D by a factor drawn uniformly in [LO, HI]")
    p.add_argument("--vae-inputs", metavar="DIR", help="lgm: pass the 4 input views through this toy VAE")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="vae: KL weight (LDM's, see train_vae)")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead"],
                   help="mvdream: torch.compile the loss (GPU: fewer launches); reduce-overhead: also as CUDA graphs")
    p.add_argument("--max-minutes", type=float, default=0, help="mvdream, lgm: stop (and save) after this long (0: never)")
    p.add_argument("--state", help="mvdream: training-state file to continue from if it exists, written when this "
                   "call stops (exact resume across calls: pair with --max-minutes)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--snapshot", action="append", default=[], metavar="STEP:DIR",
                   help="mvdream: also save the model at STEP into DIR (repeatable)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="objects per step (default 512 mvdream, 32 lgm; images for vae, default 128)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 vae, 1e-3 mvdream/lgm)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved MVDream weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of the empty prompt (mvdream)")
    p.add_argument("--extra-views", type=int, default=4, help="random supervision views per object (lgm)")
    p.add_argument("--lambda-lpips", type=float, default=1.0, help="LPIPS weight in the LGM loss")
    p.add_argument("--bank", type=int, default=16384, help="procedural examples generated for the run")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating objects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-every", type=int, default=1000, help="write a sample grid every N steps")
    p.add_argument("--log-dir", default="outputs/sft", help="where sample grids go")
    args = p.parse_args(argv)
    if not args.out and args.model != "latents":
        p.error(f"`python -m toy.sft {args.model}` needs --out")
    if (args.init or args.scale_range or args.vae_inputs) and args.model != "lgm":
        raise ValueError("--init, --scale-range and --vae-inputs apply to `python -m toy.sft lgm` only")
    if args.scale_range and not 0 < args.scale_range[0] <= args.scale_range[1]:
        raise ValueError(f"--scale-range {args.scale_range}: give 0 < LO <= HI")
    if args.state and args.model != "mvdream":
        raise ValueError("--state applies to `python -m toy.sft mvdream` only")
    args.batch_size = args.batch_size or {"vae": 128, "mvdream": 512, "lgm": 32}.get(args.model)
    args.lr = args.lr or (5e-4 if args.model == "vae" else 1e-3)
    os.makedirs(args.log_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    {"vae": train_vae, "mvdream": train_mvdream, "lgm": train_lgm, "latents": set_latents}[args.model](args, device)


def set_latents(args, device):
    # A trained VAE's latent normalisation (normalize_latents), recomputed on its own bank's first images and
    # written into --vae's config and record in place; the weights are not touched
    vae = read_vae(args.vae).to(device).eval()
    record_path = os.path.join(args.vae, "sft_record.json")
    with read_or_explain(record_path, "the toy VAE's training record (toy/sft.py vae)", "retrain the VAE"):
        record = json.load(open(record_path))
    trained = record["args"]
    images = make_bank(min(args.bank, 256), trained["seed"], device, args.workers)["views"].flatten(0, 1)[:1024]
    normalize_latents(vae, images)
    vae.save_config(args.vae)
    record.update(scaling_factor=vae.config.scaling_factor, latents_mean=vae.config.latents_mean,
                  latents_set_by=f"python -m toy.sft latents --vae {args.vae}")
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.vae}: latents_mean {[round(v, 3) for v in vae.config.latents_mean]}, "
          f"scaling_factor {vae.config.scaling_factor:.4f}")


if __name__ == "__main__":
    main()
