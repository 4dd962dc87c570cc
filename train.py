"""Carve3D: RL finetuning of MVDream for multi-view reconstruction consistency (Xie et al., CVPR 2024, Sec. 4).

One epoch = sample 4-view trajectories with the LoRA policy (sample.py) -> MRC reward through LGM
(reward.py, Sec. 3) -> per-prompt normalised reward minus normalised KL to the SFT model (kl.py, Sec. 4.2)
-> one pure on-policy PPO update over all samples and timesteps (ppo.py, Sec. 4.2). Epoch 0 only fills
the stat trackers (Carve3D's warm-up). Plumbing (config, torchrun, checkpoints, logs, MFU) is in support/.

Launch:
    python train.py toy.yaml                                               # 1 process (CPU or 1 GPU)
    torchrun --standalone --nproc_per_node=1 train.py toy.yaml             # the quickstart's main job
    torchrun --standalone --nproc_per_node=8 train.py config.yaml          # paper setup, 8 GPUs
    torchrun --nnodes=6 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 train.py config.yaml   # 48 GPUs, as Carve3D
Any config field can be overridden: python train.py toy.yaml num_epochs=3 run_dir=runs/try
A restarted run (same run_dir, resume: auto) continues from its newest complete checkpoint.
"""

import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import toy
from kl import advantages_with_kl, kl_estimate
from mvdream import MVDreamPolicy
from ppo import ppo_update
from reconstruct import LGM
from reward import MRCReward, load_lpips
from sample import sample_trajectories
from stat_tracking import PerPromptStatTracker
from support import checkpoint, devices
from support.config import batch_plan, save_resolved
from support.config import load_config as _load_config
from support.flops import Throughput
from support.prompts import epoch_prompts, load_prompts
from support.run_log import Logger
from support.seeding import make_generator


@dataclass
class Config:  # one flat config, one comment per field; YAML keys have the same names
    # --- run
    run_dir: str = "runs/toy"             # checkpoints, metrics.jsonl, TensorBoard, images and the resolved config
    seed: int = 42                        # every generator derives from (seed, epoch, rank): resumes are exact
    num_epochs: int = 40                  # including the warm-up epoch 0 (Carve3D: 55 epochs -> 54 updates)
    resume: str = "auto"                  # auto: newest complete checkpoint in run_dir; never; or a checkpoint path
    save_every: int = 1                   # checkpoint every N epochs (and at the end)
    val_every: int = 5                    # validation (MRC and KL on fixed prompts and noise) every N epochs
    device: str = "auto"                  # auto (cuda if available), cuda or cpu
    mixed_precision: str = "bf16"         # bf16 autocast for UNet/LGM on CUDA (log-prob math stays fp32); "no" = fp32
    nonfinite: str = "skip"               # non-finite loss/grad: skip the update on every rank (and count) or stop
    wandb: bool = False                   # also log to Weights & Biases (needs `pip install wandb`)
    # --- models
    world: str = "toy"                    # toy (tiny MVDream/LGM, 64 px) or paper (MVDream sd21-4view + LGM big)
    policy: str = "checkpoints/toy/sft-base"   # MVDream: local dir/file or hub id
    lgm: str = "checkpoints/toy/lgm-tiny.safetensors"  # LGM: local file/dir or hub id
    lgm_config: str = "tiny"              # LGM architecture: tiny or big
    random_init: bool = False             # random weights instead of checkpoints: benchmarks and smoke tests ONLY
    elevation: float = 15.0               # camera elevation in MVDream's convention (degrees, positive = above)
    # --- prompts
    train_prompts: str = "toy:train"      # toy:train, toy:test, or a text file with one prompt per line
    num_train_prompts: int = 0            # use only the first N training prompts (0 = all; Carve3D used 30)
    val_prompts: str = "toy:test"         # prompts for validation, same forms
    num_val_prompts: int = 8              # first N validation prompts, each with a fixed initial noise
    # --- sampling (Carve3D: 100 steps, eta 1, guidance 5)
    num_steps: int = 20                   # DDIM steps per trajectory
    eta: float = 1.0                      # DDIM stochasticity; 1 = DDPM posterior variance (a stochastic policy)
    guidance_scale: float = 5.0           # classifier-free guidance, the same in sampling and training
    sample_batch_size: int = 8            # prompts per sampling batch, per rank
    num_batches_per_epoch: int = 2        # sampling batches per epoch, per rank
    # --- PPO (Carve3D's final values: desaixie/carve3d config/dgx.py carve3d_train)
    train_batch_size: int = 8             # samples per micro-batch, per rank
    gradient_accumulation_steps: int = 2  # micro-batches per optimizer step; equal totals = pure on-policy
    num_inner_epochs: int = 1             # passes over the samples per epoch
    timestep_fraction: float = 1.0        # fraction of each trajectory's timesteps trained on
    train_cfg: bool = True                # classifier-free guidance in the training forward
    clip_range: float = 1e-4              # PPO ratio clip (tiny because log-probs are per-dimension means)
    adv_clip_max: float = 5.0             # advantages clipped to [-5, 5]
    learning_rate: float = 3e-4           # AdamW on the LoRA weights
    adam_beta1: float = 0.9               # AdamW beta1
    adam_beta2: float = 0.999             # AdamW beta2
    adam_weight_decay: float = 1e-4       # AdamW weight decay
    adam_epsilon: float = 1e-8            # AdamW epsilon
    max_grad_norm: float = 1.0            # gradient clipping
    lora_rank: int = 4                    # LoRA rank on to_q, to_k, to_v, to_out.0
    lora_alpha: float = 4.0               # LoRA alpha (scale alpha / rank; rank = alpha -> scale 1 as in DDPO)
    # --- reward and per-prompt stat tracking (Carve3D: 75 / 25)
    lpips_size: int = 0                   # crops resized to this size for LPIPS (0 = the view resolution, as Carve3D)
    per_prompt_stat_tracking: bool = True # z-score rewards per prompt (else over the whole batch)
    stat_buffer_size: int = 75            # per-prompt history length (about 3 epochs of samples per prompt)
    stat_min_count: int = 25              # below this many values a prompt uses the batch statistics
    # --- KL regularisation (Carve3D Sec. 4.2; kl.py)
    kl_log: bool = True                   # log validation KL to the reference (LoRA disabled)
    kl_penalty: bool = True               # compute the reference log-probs while sampling and use the KL
    kl_in_reward: bool = True             # KL in the advantage (else in the loss, weight kl_beta)
    kl_per_prompt_stat_tracking: bool = True  # z-score KL per prompt with its own tracker
    kl_normalized_coeff: float = 0.2      # A = z_reward - c * z_KL
    kl_beta: float = 0.001                # in-loss KL weight (only when kl_in_reward is false)
    # --- logging
    log_images: int = 4                   # objects in each epoch's captioned image grid (0 = none)


load_config = partial(_load_config, Config)  # (path, overrides) -> Config; errors name the key and the fix


# ----------------------------------------------------------------------------------------------
# Models: the policy (MVDream + LoRA), the reward (LGM + LPIPS); the reference is the policy with LoRA off.

def build_models(cfg, device):
    if cfg.random_init:
        if cfg.world == "toy":
            policy = MVDreamPolicy.tiny(vocab=toy.VOCAB, seed=cfg.seed, elevation=cfg.elevation)
        else:
            policy = MVDreamPolicy.random_init("sd21-4view", seed=cfg.seed, elevation=cfg.elevation)
        torch.manual_seed(cfg.seed)
        lgm = LGM(cfg.lgm_config)
    else:
        policy = MVDreamPolicy.from_pretrained(cfg.policy, elevation=cfg.elevation)
        # The policy's camera conditioning must show the views the reward reconstructs at cfg.elevation;
        # a saved toy policy keeps the elevation it was trained with.
        if policy.elevation != cfg.elevation:
            raise ValueError(f"config key 'elevation' is {cfg.elevation}, but policy {cfg.policy!r} was trained at "
                             f"elevation {policy.elevation}; set elevation: {policy.elevation}")
        lgm = LGM.from_pretrained(cfg.lgm, config=cfg.lgm_config)
    policy.add_lora(cfg.lora_rank, cfg.lora_alpha)
    policy.to(device).eval()  # eval throughout: no dropout, so sampling and training forwards agree
    lgm.to(device).eval().requires_grad_(False)
    reward_fn = MRCReward(lgm, load_lpips("alex").to(device), elevation=cfg.elevation,
                          lpips_size=cfg.lpips_size or None)
    return policy, reward_fn


# ----------------------------------------------------------------------------------------------
# Sampling + reward for one epoch (or for validation), then the advantages

TRAIN_KEYS = ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs", "ref_log_probs")


def rollout(cfg, policy, reward_fn, prompts, generator, autocast, with_reference, initial_noise=None):
    batches = []
    for i in range(0, len(prompts), cfg.sample_batch_size):
        chunk = prompts[i:i + cfg.sample_batch_size]
        noise = None if initial_noise is None else initial_noise[i:i + cfg.sample_batch_size]
        with autocast():
            traj = sample_trajectories(policy, chunk, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                       eta=cfg.eta, generator=generator, initial_noise=noise,
                                       with_reference=with_reference)
            out = reward_fn(traj["views"])
        batch = {k: traj[k] for k in TRAIN_KEYS if k in traj}
        batch.update(views=traj["views"], reward=out["reward"].float(), mrc=out["mrc"].float())
        batches.append(batch)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def validate(cfg, policy, reward_fn, val_prompts, rank, world, device, autocast, logger, epoch):
    """MRC and KL on fixed prompts with fixed initial noise and fixed step noise (Carve3D's val)."""
    C, h, w = policy.latent_shape
    g = make_generator("cpu", cfg.seed, "val-noise")
    noise = torch.randn(len(val_prompts), policy.num_views, C, h, w, generator=g).to(device)
    mine = list(range(rank, len(val_prompts), world))
    out = rollout(cfg, policy, reward_fn, [val_prompts[i] for i in mine], make_generator(device, cfg.seed, "val", rank),
                  autocast, with_reference=cfg.kl_log, initial_noise=noise[mine]) if mine else None
    mrc = out["mrc"] if out else torch.zeros(0, device=device)
    kl = kl_estimate(out["log_probs"], out["ref_log_probs"]) if out and cfg.kl_log else torch.zeros_like(mrc)
    if out is not None:
        mrcs = out["mrc"].tolist()
        logger.grid(epoch, "val", out["views"], [f"{p} | MRC {m:.3f}" for p, m in zip(val_prompts[::world], mrcs)])
    return {"val_mrc": torch.cat(devices.gather_list([mrc.cpu()])).mean().item(),
            "val_kl": torch.cat(devices.gather_list([kl.cpu()])).mean().item()}


def advantages(cfg, samples, prompts, trackers, rank, samples_per_rank):
    """Rewards and KL gathered from every rank -> identical trackers everywhere -> this rank's advantages."""
    all_prompts = devices.gather_list(prompts)
    rewards = devices.gather_tensor(samples["reward"]).cpu().numpy()
    kl = None
    if cfg.kl_penalty:
        kl = devices.gather_tensor(kl_estimate(samples["log_probs"], samples["ref_log_probs"])).cpu().numpy()
    if cfg.per_prompt_stat_tracking:
        z_reward = trackers["reward"].update(all_prompts, rewards)
    else:
        z_reward = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    adv = advantages_with_kl(z_reward, kl, all_prompts, trackers["kl"], kl_in_reward=cfg.kl_in_reward,
                             kl_per_prompt_stat_tracking=cfg.kl_per_prompt_stat_tracking,
                             kl_normalized_coeff=cfg.kl_normalized_coeff)
    adv = torch.as_tensor(adv, dtype=torch.float32)[rank * samples_per_rank:(rank + 1) * samples_per_rank]
    metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "mrc_mean": float(-rewards.mean())}
    if kl is not None:
        metrics.update(kl_mean=float(kl.mean()), kl_std=float(kl.std()))
    return adv, metrics


def update(cfg, model, policy, samples, adv, optimizer, plan, params, autocast, epoch, rank, counters):
    """One PPO epoch (ppo.py): a single optimizer step with every sample when the plan is pure on-policy."""
    infos = ppo_update(model, policy, {k: samples[k] for k in TRAIN_KEYS if k in samples}, adv, optimizer, plan,
                       eta=cfg.eta, guidance_scale=cfg.guidance_scale, train_cfg=cfg.train_cfg,
                       clip_range=cfg.clip_range, adv_clip_max=cfg.adv_clip_max, max_grad_norm=cfg.max_grad_norm,
                       generator=make_generator("cpu", cfg.seed, "shuffle", epoch, rank), autocast=autocast,
                       kl_beta=cfg.kl_beta, kl_in_loss=cfg.kl_penalty and not cfg.kl_in_reward,
                       nonfinite=cfg.nonfinite, params=params, num_inner_epochs=cfg.num_inner_epochs)
    counters["global_step"] += sum(1 - i["skipped"] for i in infos)
    counters["skipped_updates"] += sum(i["skipped"] for i in infos)
    return {k: float(np.mean([i[k] for i in infos])) for k in infos[0]}


# ----------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cfg = load_config(argv[0], argv[1:])
    rank, world, device = devices.setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    plan = batch_plan(cfg, world).validate()
    amp = device.type == "cuda" and cfg.mixed_precision == "bf16"
    autocast = partial(devices.autocast, device, amp)
    train_prompts = load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    val_prompts = load_prompts(cfg.val_prompts, cfg.num_val_prompts)

    policy, reward_fn = build_models(cfg, device)
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    model = devices.wrap_ddp(policy, device)  # the training forward goes through DDP: LoRA grads are all-reduced
    trackers = {"reward": PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count),
                "kl": PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)}
    ckpt, start_epoch, counters = checkpoint.resume(cfg, policy, optimizer, trackers,
                                                    {"global_step": 0, "skipped_updates": 0}, rank)
    logger = Logger(cfg, rank, start_epoch)
    throughput = Throughput(policy, device, cfg, plan, world, amp)
    if rank == 0:
        save_resolved(cfg, cfg.run_dir)
        print(plan.describe())
        print(f"device {device}, mixed precision {'bf16' if amp else 'fp32'}, {len(train_prompts)} train prompts, "
              f"{len(val_prompts)} val prompts, LoRA params {sum(p.numel() for p in lora_params):,}")
        print(f"resumed from {ckpt} (next epoch {start_epoch})" if ckpt else "starting a new run")
        print(throughput.describe())

    bar = tqdm(range(start_epoch, cfg.num_epochs), disable=rank != 0, initial=start_epoch, total=cfg.num_epochs,
               desc="epochs")
    for epoch in bar:
        metrics = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # ---- validation: before the first update and every val_every epochs
        if epoch % cfg.val_every == 0 or epoch == cfg.num_epochs - 1:
            metrics.update(validate(cfg, policy, reward_fn, val_prompts, rank, world, device, autocast, logger, epoch))

        # ---- sampling + reward (Carve3D Sec. 3, Fig. 2)
        t0 = time.perf_counter()
        prompts = epoch_prompts(cfg, train_prompts, epoch, rank, world, plan.samples_per_rank)
        with torch.no_grad():
            samples = rollout(cfg, policy, reward_fn, prompts, make_generator(device, cfg.seed, "sample", epoch, rank),
                              autocast, with_reference=cfg.kl_penalty)
        devices.sync(device)
        t_sample = time.perf_counter() - t0

        # ---- advantages: per-prompt z-scored reward minus c x z-scored KL (Carve3D Sec. 4.2)
        adv, stats = advantages(cfg, samples, prompts, trackers, rank, plan.samples_per_rank)
        metrics.update(stats)

        # ---- PPO update (epoch 0 is Carve3D's warm-up: trackers only)
        t1 = time.perf_counter()
        if epoch > 0:
            metrics.update(update(cfg, model, policy, samples, adv, optimizer, plan, lora_params, autocast, epoch,
                                  rank, counters))
        devices.sync(device)

        # ---- bookkeeping: throughput, logs, pictures, checkpoint
        metrics.update(throughput(epoch, t_sample, time.perf_counter() - t1, cfg.kl_penalty), **counters)
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        logger.log(epoch, metrics)
        rewards = samples["reward"].tolist()
        logger.grid(epoch, "train", samples["views"], [f"{p} | r {r:.3f}" for p, r in zip(prompts, rewards)])
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("mrc_mean", "val_mrc", "kl_mean", "samples_per_s")
                         if k in metrics})
        if (epoch + 1) % cfg.save_every == 0 or epoch == cfg.num_epochs - 1:
            checkpoint.save_checkpoint(cfg, epoch, policy, optimizer, trackers, counters, rank)
    logger.close()
    devices.shutdown()
    # This rank's final state, for programmatic use (tests compare ranks and resumes with it).
    return {"policy": policy, "optimizer": optimizer, "trackers": trackers, "counters": counters}


if __name__ == "__main__":
    main(sys.argv[1:])
