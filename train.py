"""Carve3D: RL finetuning of MVDream for multi-view reconstruction consistency (Xie et al., CVPR 2024, Sec. 4).

One epoch = sample 4-view trajectories with the LoRA policy (sample.py) -> MRC reward through LGM
(reward.py, Carve3D Sec. 3) -> per-prompt normalised reward minus normalised KL to the SFT model (kl.py,
Carve3D Sec. 4.2) -> one pure on-policy PPO update over all samples and timesteps (ppo.py, Carve3D Sec. 4.2)
-> validation. Epoch 0 only fills the stat trackers (Carve3D's warm-up). The config states totals; per-GPU
batches follow from the number of GPUs. Plumbing (config, batch plan, torchrun, checkpoints, logs, MFU): support/.

Launch:
    python train.py toy.yaml                                               # 1 process (CPU or 1 GPU)
    torchrun --standalone --nproc_per_node=1 train.py toy.yaml             # the quickstart's main job
    torchrun --standalone --nproc_per_node=8 train.py config.yaml          # paper setup, 8 GPUs
    torchrun --nnodes=6 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 train.py config.yaml   # 48 GPUs, as Carve3D
    python train.py config.yaml --plan 8                                   # print the batch plan for 8 GPUs
Any field can be overridden (python train.py toy.yaml num_epochs=3); a rerun resumes from its newest intact checkpoint.
"""

import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from kl import adapt_kl_coeff, advantages_with_kl, kl_estimate
from mvdream import MVDreamPolicy
from ppo import ppo_update, summarize
from reconstruct import LGM
from reward import MRCReward, load_lpips
from sample import sample_trajectories
from stat_tracking import PerPromptStatTracker
from support import checkpoint, compiling, devices
from support.config import batch_plan, load_config as _load_config, print_plan, save_resolved
from support.diversity import per_prompt_diversity
from support.flops import Throughput
from support.prompts import epoch_prompts
from support.run_log import Logger
from support.seeding import make_generator
from toy import world
from toy.fidelity import fidelity_and_size
from toy.prompts import load_prompts


@dataclass
class Config:  # one flat config, one comment per field; YAML keys have the same names
    # ==== Carve3D (Sec. 4). Paper values: desaixie/carve3d config/dgx.py carve3d_train, 48 GPUs ====
    run_dir: str = "runs/toy"             # checkpoints, metrics.jsonl, TensorBoard, images and the resolved config
    seed: int = 42                        # Carve3D 42; every generator derives from (seed, epoch, rank): exact resumes
    num_epochs: int = 40                  # including the warm-up epoch 0 (Carve3D: 55 epochs -> 54 updates)
    val_every: int = 5                    # validation after every N-th epoch's update, and of epoch 0 (Carve3D 30)
    world: str = "toy"                    # toy (tiny MVDream/LGM, 64 px) or paper (Carve3D: MVDream sd21 + LGM big)
    policy: str = "checkpoints/toy/sft-base"   # MVDream: local dir/file or hub id
    lgm: str = "checkpoints/toy/lgm-tiny-v3.safetensors"  # LGM: local file/dir or hub id
    lgm_config: str = "tiny"              # LGM architecture: tiny or big (Carve3D's reward: LGM big)
    elevation: float = 15.0               # camera elevation, MVDream's convention (degrees, + = above; paper setup 0)
    train_prompts: str = "toy:train"      # toy:train, toy:test, a text file (one per line) or library.json:key
    num_train_prompts: int = 0            # N training prompts evenly spread over the source (0 = all; Carve3D 30)
    val_prompts: str = "toy:test"         # prompts for validation, same forms (Carve3D: DreamFusion's)
    num_val_prompts: int = 8              # N validation prompts, each with a fixed initial noise
    num_steps: int = 20                   # DDIM steps per trajectory (Carve3D 100)
    eta: float = 1.0                      # DDIM stochasticity; 1 = DDPM posterior variance, a stochastic policy (1.0)
    guidance_scale: float = 5.0           # classifier-free guidance, the same in sampling and training (5.0)
    samples_per_epoch: int = 32           # total over all GPUs (Carve3D 768); per-GPU shares follow from the count
    updates_per_epoch: int = 1            # optimizer steps per epoch; 1 = Carve3D's pure on-policy update
    num_inner_epochs: int = 1             # passes over the samples per epoch (1)
    timestep_fraction: float = 1.0        # fraction of each trajectory's timesteps trained on (1.0)
    train_cfg: bool = True                # classifier-free guidance in the training forward (true)
    clip_range: float = 1e-4              # PPO ratio clip, tiny because log-probs are per-dimension means (1e-4)
    adv_clip_max: float = 5.0             # advantages clipped to [-5, 5] (5)
    learning_rate: float = 3e-4           # AdamW on the LoRA weights (3e-4)
    adam_beta1: float = 0.9               # AdamW beta1 (0.9)
    adam_beta2: float = 0.999             # AdamW beta2 (0.999)
    adam_weight_decay: float = 1e-4       # AdamW weight decay (1e-4)
    adam_epsilon: float = 1e-8            # AdamW epsilon (1e-8)
    max_grad_norm: float = 1.0            # gradient clipping (1.0)
    lora_rank: int = 4                    # LoRA rank on to_q, to_k, to_v, to_out.0 (4)
    lora_alpha: float = 4.0               # LoRA alpha: scale alpha / rank = 1, as DDPO's unscaled LoRA
    lpips_size: int = 0                   # crops resized to this size for LPIPS (0 = the view resolution, as Carve3D)
    mrc_fg_threshold: float = 0.95        # object box: pixels with a channel below this (0.95; toy: 0.8, reward.py)
    per_prompt_stat_tracking: bool = True # z-score rewards per prompt (else over the whole batch) (true)
    stat_buffer_size: int = 0             # per-prompt history (0 = 3 epochs of samples per prompt: Carve3D's 75)
    stat_min_count: int = 0               # fewer values: batch statistics (0 = one epoch's samples per prompt: 25)
    kl_log: bool = True                   # log validation KL to the reference, the policy with LoRA off (true)
    kl_penalty: bool = True               # reference log-probs while sampling, KL used in training (true)
    kl_in_reward: bool = True             # KL in the advantage (else in the loss, weight kl_beta) (true)
    kl_per_prompt_stat_tracking: bool = True  # z-score KL per prompt with its own tracker (true)
    kl_normalized_coeff: float = 0.2      # A = z_reward - c * z_KL (0.2)
    kl_beta: float = 0.001                # in-loss KL weight, only when kl_in_reward is false (0.001)
    # ==== Beyond the paper: how it runs (results do not depend on these) ====
    resume: str = "auto"                  # auto: newest complete checkpoint in run_dir; never; or a checkpoint path
    save_every: int = 1                   # checkpoint every N epochs (and at the end)
    device: str = "auto"                  # auto (cuda if available), cuda or cpu
    mixed_precision: str = "bf16"         # CUDA: bf16 frozen weights + fp32 LoRA under bf16 autocast; "no" = fp32
    compile: bool = True                  # CUDA: torch.compile the UNet, VAE decoder and LGM (false: eager)
    compile_regional: bool = False        # compile each repeated block once, not whole networks: shorter warm-up
    micro_batch_size: int = 8             # prompts per UNet call on one GPU, in sampling and training alike
    nonfinite: str = "skip"               # non-finite loss/grad: skip the update on every rank (and count) or stop
    wandb: bool = False                   # also log to Weights & Biases (needs `pip install wandb`)
    log_images: int = 4                   # objects in each epoch's captioned image grid (0 = none)
    random_init: bool = False             # random weights instead of checkpoints: benchmarks and smoke tests ONLY
    # ==== Beyond the paper: extensions, off by default (docs/DESIGN.md) ====
    fused_lora: bool = False              # each LoRA layer as one GEMM (support/lora_kernel.py): 5% faster epoch
    lgm_recenter: bool = False            # LGM app.py's per-view recentring (off: it forgives what MRC must see)
    mrc_object_size: float = 0.0          # > 0: views zoomed alike to this object size before MRC (toy: 0.6, reward.py)
    kl_mean_coeff: float = 0.0            # weight of the exact per-step KL in the loss (kl.py)
    kl_target: float = 0.0                # > 0: adapt kl_mean_coeff each epoch toward this per-step KL (kl.py)
    num_val_samples: int = 1              # samples per val prompt, each its own fixed noise (>= 2: val diversity)
    # best/ = lowest val MRC among validations that pass these (support/checkpoint.py BestCheckpoint):
    best_max_val_kl: float = 0.0          # val KL at most this (0 = no limit; Carve3D stops at a safe KL by hand)
    best_max_fidelity_drop: float = 0.05  # toy: val fidelity within this of epoch 0's (an MRC bought by the prompt)
    best_max_size_drift: float = 0.05     # toy: val size bias within this of epoch 0's or nearer 0 (MRC bought by size)
    best_min_diversity: float = 0.0       # val diversity at least this fraction of epoch 0's (0 = off)


load_config = partial(_load_config, Config)  # (path, overrides) -> Config; errors name the key and the fix


# ----------------------------------------------------------------------------------------------
# Models: the policy (MVDream + LoRA), the reward (LGM + LPIPS); the reference is the policy with LoRA off.

def build_models(cfg, device):
    if cfg.random_init:
        policy = (MVDreamPolicy.tiny(vocab=world.VOCAB, seed=cfg.seed, elevation=cfg.elevation) if cfg.world == "toy"
                  else MVDreamPolicy.random_init("sd21-4view", seed=cfg.seed, elevation=cfg.elevation, device=device))
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
    frozen = devices.frozen_dtype(device, cfg.mixed_precision)  # bf16 base on CUDA; LoRA stays fp32 (add_lora)
    policy.to(device, frozen).add_lora(cfg.lora_rank, cfg.lora_alpha, fused=cfg.fused_lora)
    policy.eval()  # eval throughout: no dropout, so sampling and training forwards agree
    lgm.to(device, frozen).eval().requires_grad_(False)
    reward_fn = MRCReward(lgm, load_lpips("alex").to(device), cfg.elevation, cfg.lpips_size or None,
                          cfg.lgm_recenter, cfg.mrc_fg_threshold, cfg.mrc_object_size)
    return policy, reward_fn


# ----------------------------------------------------------------------------------------------
# Sampling + reward for one epoch (or for validation), advantages, update

TRAIN_KEYS = ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs", "ref_log_probs", "ref_means")


def rollout(cfg, policy, reward_fn, prompts, micro, generators, autocast, with_reference):
    # generators: one per sample (its noise does not depend on batching or on the number of GPUs)
    batches = []
    for i in range(0, len(prompts), micro):  # micro-batches: what fits one GPU (config micro_batch_size)
        with autocast():
            traj = sample_trajectories(policy, prompts[i:i + micro], num_steps=cfg.num_steps, eta=cfg.eta,
                                       guidance_scale=cfg.guidance_scale, generator=generators[i:i + micro],
                                       with_reference=with_reference)
        out = reward_fn(traj["views"])
        batch = {k: traj[k] for k in TRAIN_KEYS if k in traj}
        batch.update(views=traj["views"], reward=out["reward"].float(), mrc=out["mrc"].float())
        batches.append(batch)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def validate(cfg, policy, reward_fn, val_prompts, plan, rank, world, autocast, logger, epoch):
    """MRC, KL, toy fidelity, size bias (diversity: num_val_samples >= 2) on fixed prompts and noise (Carve3D's val)."""
    mine, S = list(range(rank, len(val_prompts), world)), cfg.num_val_samples
    prompts, out = [val_prompts[i] for i in mine for _ in range(S)], {}
    if mine:  # sample 0 of prompt i draws the noise it drew when validation had one sample per prompt
        gens = [make_generator("cpu", cfg.seed, "val", *((i, s) if s else (i,))) for i in mine for s in range(S)]
        out = rollout(cfg, policy, reward_fn, prompts, plan.micro_batch_size, gens, autocast, cfg.kl_log)
        logger.grid(epoch, "val", out["views"], [f"{p} | MRC {m:.3f}" for p, m in zip(prompts, out["mrc"].tolist())])
    gathered = {"val_mrc": out.get("mrc", torch.zeros(0))}
    if S > 1:
        gathered["val_diversity"] = per_prompt_diversity(out["views"].unflatten(0, (len(mine), S)),
                                                         reward_fn.lpips_model) if out else torch.zeros(0)
    if cfg.kl_log:
        gathered["val_kl"] = kl_estimate(out["log_probs"], out["ref_log_probs"]) if out else torch.zeros(0)
    if cfg.world == "toy":
        fid, _, bias = fidelity_and_size(out["views"].cpu(), prompts) if out else (torch.zeros(0),) * 3
        gathered.update(val_fidelity=fid, val_size_bias=bias)
    return {k: torch.cat(devices.gather_list([v.float().cpu()])).mean().item() for k, v in gathered.items()}


def advantages(cfg, samples, prompts, trackers, rank, samples_per_rank, policy_moved):
    """Rewards and KL gathered from every rank -> identical trackers everywhere -> this rank's advantages. Until the
    first update the policy IS the reference: its KL (0 up to numerics) stays out of the KL tracker's buffers."""
    all_prompts = devices.gather_list(prompts)
    rewards = devices.gather_tensor(samples["reward"]).cpu().numpy()
    kl = (devices.gather_tensor(kl_estimate(samples["log_probs"], samples["ref_log_probs"])).cpu().numpy()
          if cfg.kl_penalty else None)
    z_reward = (trackers["reward"].update(all_prompts, rewards) if cfg.per_prompt_stat_tracking
                else (rewards - rewards.mean()) / (rewards.std() + 1e-6))
    adv = advantages_with_kl(z_reward, kl if policy_moved else None, all_prompts, trackers["kl"],
                             kl_in_reward=cfg.kl_in_reward, kl_normalized_coeff=cfg.kl_normalized_coeff,
                             kl_per_prompt_stat_tracking=cfg.kl_per_prompt_stat_tracking)
    metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "mrc_mean": float(-rewards.mean()), "advantage_mean": float(np.mean(adv)),
               "advantage_std": float(np.std(adv))}
    if kl is not None:
        metrics.update(kl_mean=float(kl.mean()), kl_std=float(kl.std()))
    adv = torch.as_tensor(adv, dtype=torch.float32)[rank * samples_per_rank:(rank + 1) * samples_per_rank]
    return adv, metrics


def update(cfg, model, policy, samples, adv, optimizer, plan, params, autocast, epoch, rank, counters):
    """One PPO epoch (ppo.py): a single optimizer step with every sample when the plan is pure on-policy."""
    infos = ppo_update(model, policy, {k: samples[k] for k in TRAIN_KEYS if k in samples}, adv, optimizer, plan,
                       eta=cfg.eta, guidance_scale=cfg.guidance_scale, train_cfg=cfg.train_cfg,
                       clip_range=cfg.clip_range, adv_clip_max=cfg.adv_clip_max, max_grad_norm=cfg.max_grad_norm,
                       generator=make_generator("cpu", cfg.seed, "shuffle", epoch, rank), autocast=autocast,
                       kl_beta=cfg.kl_beta, kl_in_loss=cfg.kl_penalty and not cfg.kl_in_reward,
                       kl_mean_coeff=counters["kl_mean_coeff"], nonfinite=cfg.nonfinite, params=params)
    counters["global_step"] += sum(1 - i["skipped"] for i in infos)
    counters["skipped_updates"] += sum(i["skipped"] for i in infos)
    summary = summarize(infos)
    if cfg.kl_target > 0 and counters["global_step"] > 1:  # (the first update starts AT the reference: KL 0)
        counters["kl_mean_coeff"] = adapt_kl_coeff(counters["kl_mean_coeff"], summary["kl_step"], cfg.kl_target)
    return summary


# ----------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        return print(__doc__)
    if "--plan" in argv:  # print the batch plan for N ranks after every check a launch runs, load no model
        return print_plan(Config, argv, load_prompts)
    cfg = load_config(argv[0], argv[1:])
    rank, world, device = devices.setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    train_prompts = load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    val_prompts = load_prompts(cfg.val_prompts, cfg.num_val_prompts)
    plan = batch_plan(cfg, world, len(train_prompts)).validate()
    autocast = partial(devices.autocast, device, cfg.mixed_precision == "bf16")

    policy, reward_fn = build_models(cfg, device)
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    model = devices.wrap_ddp(policy, device)  # the training forward goes through DDP: LoRA grads are all-reduced
    trackers = {key: PerPromptStatTracker(plan.buffer_size, plan.min_count) for key in ("reward", "kl")}
    counters = {"global_step": 0, "skipped_updates": 0, "kl_mean_coeff": cfg.kl_mean_coeff}
    ckpt, start_epoch, counters = checkpoint.resume(cfg, policy, optimizer, trackers, counters, rank)
    best = checkpoint.BestCheckpoint(cfg, counters)
    logger = Logger(cfg, rank, start_epoch)
    throughput = Throughput(policy, reward_fn, device, cfg, plan, world)  # counts FLOPs on the eager UNet
    compiling.for_training(cfg, policy, reward_fn, device, rank)  # CUDA: UNet, VAE decoder, LGM; cache in run_dir
    if rank == 0:
        save_resolved(cfg, cfg.run_dir)
        print(plan.describe())
        print(f"device {device}, mixed precision {cfg.mixed_precision}, {len(train_prompts)} train prompts, "
              f"{len(val_prompts)} val prompts, LoRA params {sum(p.numel() for p in lora_params):,}")
        print(f"resumed from {ckpt} (next epoch {start_epoch})" if ckpt else "starting a new run")
        print(throughput.describe())

    bar = tqdm(range(start_epoch, cfg.num_epochs), disable=rank != 0, initial=start_epoch, total=cfg.num_epochs)
    for epoch in bar:
        throughput.start_epoch()
        # ---- sampling + reward (Carve3D Sec. 3, Fig. 2)
        prompts = epoch_prompts(cfg, train_prompts, epoch, rank, world, plan)
        with torch.no_grad():
            first = rank * plan.samples_per_rank  # global index of this rank's first sample
            samples = rollout(cfg, policy, reward_fn, prompts, plan.micro_batch_size, autocast=autocast,
                              generators=[make_generator("cpu", cfg.seed, "sample", epoch, first + j)
                                          for j in range(len(prompts))], with_reference=cfg.kl_penalty)
        throughput.mark("sample")

        # ---- advantages: per-prompt z-scored reward minus c x z-scored KL (Carve3D Sec. 4.2)
        adv, metrics = advantages(cfg, samples, prompts, trackers, rank, plan.samples_per_rank,
                                  counters["global_step"] > 0)

        # ---- PPO update (epoch 0 is Carve3D's warm-up: trackers only)
        if epoch > 0:
            metrics.update(update(cfg, model, policy, samples, adv, optimizer, plan, lora_params, autocast, epoch,
                                  rank, counters))
        throughput.mark("train")

        # ---- validation of the policy after this epoch's update (epoch 0: the starting policy), best/
        if epoch % cfg.val_every == 0 or epoch == cfg.num_epochs - 1:
            metrics.update(validate(cfg, policy, reward_fn, val_prompts, plan, rank, world, autocast, logger, epoch))
            best.consider(epoch, metrics, policy, rank)
        metrics.update(throughput.end_epoch(epoch), **counters)
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
