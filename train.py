"""Carve3D: RL finetuning of MVDream for multi-view reconstruction consistency (CVPR 2024, Sec. 4).

One epoch = sample 4-view trajectories with the LoRA policy (sample.py) -> MRC reward through LGM
(reward.py) -> per-prompt normalised reward minus normalised KL to the SFT model (kl.py) -> one
pure on-policy PPO update over all samples and timesteps (ppo.py). Epoch 0 only fills the stat
trackers (Carve3D's warm-up).

Launch:
    python train.py toy.yaml                                               # 1 process (CPU or 1 GPU)
    torchrun --standalone --nproc_per_node=1 train.py toy.yaml             # the quickstart's main job
    torchrun --standalone --nproc_per_node=8 train.py config.yaml          # paper setup, 8 GPUs
    torchrun --nnodes=6 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 train.py config.yaml   # 48 GPUs, as Carve3D
Any config field can be overridden: python train.py toy.yaml num_epochs=3 run_dir=runs/try
A restarted run (same run_dir, resume: auto) continues from its newest complete checkpoint.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import yaml

from sample import save_grid


# ----------------------------------------------------------------------------------------------
# Config: one flat dataclass, one comment per field (YAML keys have the same names).

@dataclass
class Config:
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
    # --- PPO (carve3d_ddpo_spec Sec. 4.4)
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
    lpips_size: int = 0                   # crops resized to this size before LPIPS (0 = the view resolution, as Carve3D)
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


def load_config(path, overrides=()):
    """YAML (+ key=value overrides) -> Config. Unknown keys and wrong types are errors that name the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (try toy.yaml or config.yaml)")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        # A string key takes the text as typed: YAML 1.1 would turn mixed_precision=no into False.
        raw[key] = value if hints.get(key) is str and not isinstance(parsed, str) else parsed
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = [k for k in fields if k.split("_")[0] == str(key).split("_")[0]]
            raise KeyError(f"{path}: unknown config key {key!r}" + (f" (did you mean one of {close}?)" if close else ""))
        want = hints[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and Python say float
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            quote = want is str and isinstance(value, bool)
            hint = " (quote it: YAML reads no/yes/on/off as booleans)" if quote else ""
            raise TypeError(f"{path}: config key {key!r} must be {want.__name__}, got {value!r}{hint}")
        values[key] = value
    cfg = Config(**values)
    choices = {"mixed_precision": ("bf16", "no"), "nonfinite": ("skip", "stop"), "world": ("toy", "paper"),
               "device": ("auto", "cuda", "cpu"), "lgm_config": ("tiny", "big")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{path}: config key {key!r} must be one of {allowed}, got {getattr(cfg, key)!r}")
    positive = ["num_epochs", "save_every", "val_every", "num_steps", "sample_batch_size", "num_batches_per_epoch",
                "train_batch_size", "gradient_accumulation_steps", "num_inner_epochs", "lora_rank",
                "stat_buffer_size", "stat_min_count"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{path}: config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.stat_min_count > cfg.stat_buffer_size:
        raise ValueError(f"{path}: stat_min_count ({cfg.stat_min_count}) must not exceed stat_buffer_size "
                         f"({cfg.stat_buffer_size})")
    if cfg.resume not in ("auto", "never") and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise FileNotFoundError(f"{path}: config key 'resume' is {cfg.resume!r}, not a complete checkpoint directory "
                                f"(no trainer_state.json); use auto, never or a run_dir/checkpoints/epoch_NNNN path")
    if not cfg.eta > 0:
        raise ValueError(f"{path}: config key 'eta' must be > 0, got {cfg.eta} (a deterministic DDIM step has no "
                         f"log-probability to train on)")
    # The batch arithmetic does not depend on the number of ranks (it cancels): check it before any launch.
    from ppo import BatchPlan
    try:
        BatchPlan(1, cfg.sample_batch_size, cfg.num_batches_per_epoch, cfg.train_batch_size,
                  cfg.gradient_accumulation_steps, cfg.num_steps, cfg.timestep_fraction).validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# ----------------------------------------------------------------------------------------------
# Distributed plumbing (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python = one process).

def setup_distributed(cfg):
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: cuda, but no CUDA device is available (use device: auto or cpu)")
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return rank, world, device


def is_dist():
    return dist.is_available() and dist.is_initialized()


def gather_tensor(x):
    """Concatenate a per-rank tensor (same shape on every rank) along dim 0, rank order."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_list(items):
    if not is_dist():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def barrier():
    if is_dist():
        dist.barrier()


def derive_seed(*parts):
    """A stable 63-bit seed from (seed, purpose, epoch, rank): no hidden RNG state to save or drift."""
    h = 1469598103934665603
    for p in parts:
        for b in str(p).encode():
            h = ((h ^ b) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def make_generator(device, *parts):
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


# ----------------------------------------------------------------------------------------------
# Prompts

def load_prompts(spec, limit=0):
    if spec.startswith("toy:"):
        import toy
        split = spec.split(":", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"prompt source {spec!r}: use toy:train or toy:test")
        prompts = toy.train_prompts() if split == "train" else toy.test_prompts()
    else:
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"prompt file {spec!r} not found (one prompt per line, # comments)")
        with open(spec) as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt source {spec!r} holds no prompts")
    return prompts[:limit] if limit else prompts


def epoch_prompts(cfg, prompts, epoch, rank, world, samples_per_rank):
    """This rank's prompts for an epoch. Every rank draws the same global list, then takes its slice.

    Warm-up (epoch 0, Carve3D): each prompt repeated stat_min_count times (padded with its own head to
    the global sample count) so every tracker starts from real per-prompt statistics.
    """
    total = samples_per_rank * world
    if epoch == 0:
        reps = [p for p in prompts for _ in range(cfg.stat_min_count)]
        while len(reps) < total:
            reps += reps[: total - len(reps)]
        chosen = reps[:total]
        if len(reps) > total and rank == 0:
            print(f"warning: warm-up covers {total} of {len(reps)} prompt repeats; raise the sample batch or lower "
                  f"stat_min_count so every prompt reaches min_count")
    else:
        g = make_generator("cpu", cfg.seed, "prompts", epoch)
        idx = torch.randint(len(prompts), (total,), generator=g).tolist()
        chosen = [prompts[i] for i in idx]
    return chosen[rank * samples_per_rank:(rank + 1) * samples_per_rank]


# ----------------------------------------------------------------------------------------------
# Models

def build_models(cfg, device):
    """The policy (MVDream + LoRA), the reward (LGM + LPIPS) and the reference (= LoRA disabled)."""
    from mvdream import MVDreamPolicy
    from reconstruct import LGM
    from reward import MRCReward, load_lpips

    if cfg.random_init:
        if cfg.world == "toy":
            import toy
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
    lpips_model = load_lpips("alex").to(device)
    reward_fn = MRCReward(lgm, lpips_model, elevation=cfg.elevation, lpips_size=cfg.lpips_size or None)
    return policy, reward_fn


def count_forward_flops(policy, device, guidance_scale):
    """FLOPs of one CFG policy forward for one object (4 views), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    C, h, w = policy.latent_shape
    x = torch.zeros(1, policy.num_views, C, h, w, device=device)
    emb = policy.negative_embeds.to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        policy(x, torch.full((1,), 500, device=device, dtype=torch.long), emb, guidance_scale)
    return counter.get_total_flops()


def measure_peak_flops(device, dtype):
    """Measured matmul throughput: the MFU denominator (a datasheet peak flatters nobody)."""
    n = 8192 if device.type == "cuda" else 1024  # 4096^3 does not reach the H100/H200 bf16 peak
    g = torch.Generator(device=device).manual_seed(0)  # not the global RNG: checkpoints save its state
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Checkpoints: rank 0 writes into a temporary directory and renames it (atomic on POSIX); every rank
# enters save/load together and meets at barriers, never inside a collective that only rank 0 runs.

def checkpoint_dir(cfg):
    return os.path.join(cfg.run_dir, "checkpoints")


def latest_checkpoint(cfg):
    root = checkpoint_dir(cfg)
    if not os.path.isdir(root):
        return None
    # By epoch number (epoch_10000 after epoch_9999); only epoch_<N> dirs with their marker file count.
    done = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"epoch_(\d+)", d)) and
                  os.path.isfile(os.path.join(root, d, "trainer_state.json")))
    return os.path.join(root, done[-1][1]) if done else None


def save_checkpoint(cfg, epoch, policy, optimizer, trackers, counters, rank):
    rng = gather_list([{"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
                        "python": random.getstate()[1]}])
    if rank == 0:
        root = checkpoint_dir(cfg)
        final = os.path.join(root, f"epoch_{epoch:04d}")
        tmp = os.path.join(root, f".tmp_epoch_{epoch:04d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # Standard diffusers/peft LoRA file (pytorch_lora_weights.safetensors, alpha in its header):
        # diffusers' load_lora_weights / unet.load_lora_adapter and evaluate.py --lora read it.
        policy.save_lora(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng, os.path.join(tmp, "rng_states.pt"))
        state = {"epoch": epoch, "counters": counters,
                 "trackers": {k: t.state_dict() for k, t in trackers.items()},
                 "config": dataclasses.asdict(cfg)}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: the completeness marker
            json.dump(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_checkpoint(path, policy, optimizer, trackers, rank):
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    policy.load_lora(path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu"))
    for k, t in trackers.items():
        t.load_state_dict(state["trackers"][k])
    rng = torch.load(os.path.join(path, "rng_states.pt"), weights_only=False)
    if rank < len(rng):
        torch.set_rng_state(torch.tensor(rng[rank]["torch"], dtype=torch.uint8))
    return state


# ----------------------------------------------------------------------------------------------
# Logging (rank 0 only)

def _logged_epoch(line):
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a crash: dropped with the epochs to be redone


class Logger:
    def __init__(self, cfg, rank, start_epoch=0):
        self.active = rank == 0
        self.tb = self.wandb = None
        if not self.active:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        # A restarted run repeats the epochs after its checkpoint: drop what they logged before (lines here,
        # events in TensorBoard via purge_step) so that every epoch appears once.
        path = os.path.join(cfg.run_dir, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if _logged_epoch(line) < start_epoch]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(cfg.run_dir, "tb"), purge_step=start_epoch)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("config wandb: true needs `pip install wandb` (or set wandb: false)") from e
            self.wandb = wandb.init(project="carve3d", dir=cfg.run_dir, config=dataclasses.asdict(cfg))

    def log(self, epoch, metrics):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, epoch)
        if self.wandb:
            self.wandb.log(metrics, step=epoch)

    def image(self, epoch, name, grid_path):
        if not self.active:
            return
        from PIL import Image
        img = np.asarray(Image.open(grid_path).convert("RGB"))
        self.tb.add_image(name, img, epoch, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({name: wandb.Image(grid_path)}, step=epoch)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# Sampling + reward for one epoch (or for validation)

TRAIN_KEYS = ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs", "ref_log_probs")


def rollout(cfg, policy, reward_fn, prompts, generator, autocast, with_reference, initial_noise=None):
    from sample import sample_trajectories
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


def validate(cfg, policy, reward_fn, val_prompts, rank, world, device, autocast):
    """MRC and KL on fixed prompts with fixed initial noise and fixed step noise (Carve3D's val)."""
    C, h, w = policy.latent_shape
    g = make_generator("cpu", cfg.seed, "val-noise")
    noise = torch.randn(len(val_prompts), policy.num_views, C, h, w, generator=g).to(device)
    mine = list(range(rank, len(val_prompts), world))
    out = rollout(cfg, policy, reward_fn, [val_prompts[i] for i in mine], make_generator(device, cfg.seed, "val", rank),
                  autocast, with_reference=cfg.kl_log, initial_noise=noise[mine]) if mine else None
    from kl import kl_estimate
    mrc = out["mrc"] if out else torch.zeros(0, device=device)
    kl = kl_estimate(out["log_probs"], out["ref_log_probs"]) if out and cfg.kl_log else torch.zeros_like(mrc)
    metrics = {"val_mrc": torch.cat(gather_list([mrc.cpu()])).mean().item(),
               "val_kl": torch.cat(gather_list([kl.cpu()])).mean().item()}
    return metrics, out


# ----------------------------------------------------------------------------------------------

def main(argv):
    if len(argv) < 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cfg = load_config(argv[0], argv[1:])
    rank, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    from kl import advantages_with_kl, kl_estimate
    from ppo import BatchPlan, ppo_update
    from reward import PerPromptStatTracker

    plan = BatchPlan(world, cfg.sample_batch_size, cfg.num_batches_per_epoch, cfg.train_batch_size,
                     cfg.gradient_accumulation_steps, cfg.num_steps, cfg.timestep_fraction).validate()
    amp = device.type == "cuda" and cfg.mixed_precision == "bf16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    train_prompts = load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    val_prompts = load_prompts(cfg.val_prompts, cfg.num_val_prompts)

    policy, reward_fn = build_models(cfg, device)
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    # Forward through the DDP wrapper, so DDP sees the LoRA parameters used and all-reduces their
    # gradients (the bug ddpo-pytorch #10 / diffusers #4046 fixed).
    model = policy
    if is_dist():
        model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None)
    trackers = {"reward": PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count),
                "kl": PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)}
    counters = {"global_step": 0, "skipped_updates": 0}

    start_epoch = 0
    ckpt = None if cfg.resume == "never" else (latest_checkpoint(cfg) if cfg.resume == "auto" else cfg.resume)
    if ckpt:
        state = load_checkpoint(ckpt, policy, optimizer, trackers, rank)
        start_epoch, counters = state["epoch"] + 1, state["counters"]
    logger = Logger(cfg, rank, start_epoch)
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        print(plan.describe())
        print(f"device {device}, mixed precision {'bf16' if amp else 'fp32'}, {len(train_prompts)} train prompts, "
              f"{len(val_prompts)} val prompts, LoRA params {sum(p.numel() for p in lora_params):,}")
        print(f"resumed from {ckpt} (next epoch {start_epoch})" if ckpt else "starting a new run")
    flops_fwd = count_forward_flops(policy, device, cfg.guidance_scale)
    peak = measure_peak_flops(device, torch.bfloat16 if amp else torch.float32)
    if rank == 0:
        print(f"policy forward (1 object, CFG): {flops_fwd / 1e9:.1f} GFLOP; measured matmul peak "
              f"{peak / 1e12:.2f} TFLOP/s per device")

    from tqdm import tqdm
    bar = tqdm(range(start_epoch, cfg.num_epochs), disable=rank != 0, initial=start_epoch, total=cfg.num_epochs,
               desc="epochs")
    kl_on = cfg.kl_penalty
    for epoch in bar:
        metrics = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # ---- validation: before the first update and every val_every epochs
        if epoch % cfg.val_every == 0 or epoch == cfg.num_epochs - 1:
            val, val_out = validate(cfg, policy, reward_fn, val_prompts, rank, world, device, autocast)
            metrics.update(val)
            if rank == 0 and val_out is not None and cfg.log_images:
                n = min(cfg.log_images, len(val_out["mrc"]))
                path = os.path.join(cfg.run_dir, "images", f"val_epoch_{epoch:04d}.png")
                save_grid(path, val_out["views"][:n],
                          [f"{p} | MRC {m:.3f}" for p, m in zip(val_prompts[::world], val_out["mrc"][:n].tolist())])
                logger.image(epoch, "val/samples", path)

        # ---- sampling + reward (Carve3D Sec. 3 and 4)
        t0 = time.perf_counter()
        prompts = epoch_prompts(cfg, train_prompts, epoch, rank, world, plan.samples_per_rank)
        gen = make_generator(device, cfg.seed, "sample", epoch, rank)
        with torch.no_grad():
            samples = rollout(cfg, policy, reward_fn, prompts, gen, autocast, with_reference=kl_on)
        sync(device)
        t_sample = time.perf_counter() - t0

        # ---- advantages from gathered rewards/KL: every rank updates identical trackers
        all_prompts = gather_list(prompts)
        rewards = gather_tensor(samples["reward"]).cpu().numpy()
        kl = gather_tensor(kl_estimate(samples["log_probs"], samples["ref_log_probs"])).cpu().numpy() if kl_on else None
        if cfg.per_prompt_stat_tracking:
            z_reward = trackers["reward"].update(all_prompts, rewards)
        else:
            z_reward = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        adv = advantages_with_kl(z_reward, kl, all_prompts, trackers["kl"], kl_in_reward=cfg.kl_in_reward,
                                 kl_per_prompt_stat_tracking=cfg.kl_per_prompt_stat_tracking,
                                 kl_normalized_coeff=cfg.kl_normalized_coeff)
        adv = torch.as_tensor(adv, dtype=torch.float32)[rank * plan.samples_per_rank:(rank + 1) * plan.samples_per_rank]
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                       mrc_mean=float(-rewards.mean()))
        if kl is not None:
            metrics.update(kl_mean=float(kl.mean()), kl_std=float(kl.std()))

        # ---- PPO update (epoch 0 is Carve3D's warm-up: trackers only)
        t1 = time.perf_counter()
        if epoch > 0:
            train_samples = {k: samples[k] for k in TRAIN_KEYS if k in samples}
            infos = ppo_update(model, policy, train_samples, adv, optimizer, plan, eta=cfg.eta,
                               guidance_scale=cfg.guidance_scale, train_cfg=cfg.train_cfg, clip_range=cfg.clip_range,
                               adv_clip_max=cfg.adv_clip_max, max_grad_norm=cfg.max_grad_norm,
                               generator=make_generator("cpu", cfg.seed, "shuffle", epoch, rank), autocast=autocast,
                               kl_beta=cfg.kl_beta, kl_in_loss=kl_on and not cfg.kl_in_reward,
                               nonfinite=cfg.nonfinite, params=lora_params, num_inner_epochs=cfg.num_inner_epochs)
            counters["global_step"] += sum(1 - i["skipped"] for i in infos)
            counters["skipped_updates"] += sum(i["skipped"] for i in infos)
            for k in infos[0]:
                metrics[k] = float(np.mean([i[k] for i in infos]))
        sync(device)
        t_train = time.perf_counter() - t1

        # ---- throughput: samples/s and MFU (LoRA backward ~ 1 forward: input grads only, spec anchors 3.2)
        n_samples = plan.samples_per_epoch
        fwd_sampling = n_samples * cfg.num_steps * (2 if kl_on else 1)
        fwd_training = 0 if epoch == 0 else n_samples * plan.num_train_timesteps * 2 * cfg.num_inner_epochs
        dt = t_sample + t_train
        achieved = (fwd_sampling + fwd_training) * flops_fwd / dt / world
        metrics.update(samples_per_s=n_samples / dt, t_sample=t_sample, t_train=t_train,
                       tflops_per_device=achieved / 1e12, mfu=achieved / peak, **counters)
        if device.type == "cuda":
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        logger.log(epoch, metrics)
        if rank == 0 and cfg.log_images:
            n = min(cfg.log_images, len(prompts))
            path = os.path.join(cfg.run_dir, "images", f"train_epoch_{epoch:04d}.png")
            save_grid(path, samples["views"][:n], [f"{p} | r {r:.3f}" for p, r in
                                                   zip(prompts[:n], samples["reward"][:n].tolist())])
            logger.image(epoch, "train/samples", path)
        bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("mrc_mean", "val_mrc", "kl_mean", "samples_per_s")
                         if k in metrics})

        if (epoch + 1) % cfg.save_every == 0 or epoch == cfg.num_epochs - 1:
            save_checkpoint(cfg, epoch, policy, optimizer, trackers, counters, rank)
    logger.close()
    if is_dist():
        dist.destroy_process_group()
    # This rank's final state, for programmatic use (tests compare ranks and resumes with it).
    return {"policy": policy, "optimizer": optimizer, "trackers": trackers, "counters": counters}


if __name__ == "__main__":
    main(sys.argv[1:])
