# train.py end to end on the toy world with random weights (tiny MVDream + tiny LGM of the real classes, real
# offline LPIPS): distributed consistency, exact resume, LoRA round trip, on-policy ratio, Carve3D's advantage,
# config errors, non-finite handling and checkpoint atomicity. Every run is tiny (3 DDIM steps, 2 samples per
# rank and epoch, one optimizer step per epoch) and runs on the CPU.
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from mvdream import MVDreamPolicy
from ppo import ppo_update
from sample import sample_trajectories
from stat_tracking import PerPromptStatTracker
from support import checkpoint, prompts as prompt_sources
from support.batch_plan import BatchPlan
from support.config import batch_plan
from toy import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_YAML = os.path.join(ROOT, "toy.yaml")
# Explicit values for everything the checks below depend on, so edits to toy.yaml do not change them.
# lora_alpha 8 with rank 4 (scale 2) makes the LoRA round trip detect a lost alpha.
TINY = dict(random_init=True, device="cpu", mixed_precision="no", seed=42, num_steps=3, eta=1.0, guidance_scale=5.0,
            samples_per_epoch=2, micro_batch_size=2, updates_per_epoch=1, num_inner_epochs=1, timestep_fraction=1.0, train_cfg=True, clip_range=1e-4, adv_clip_max=5.0,
            num_train_prompts=2, num_val_prompts=2, stat_min_count=1, stat_buffer_size=8, val_every=1000,
            log_images=0, lora_rank=4, lora_alpha=8.0, per_prompt_stat_tracking=True, kl_penalty=True,
            kl_in_reward=True, kl_per_prompt_stat_tracking=True, kl_normalized_coeff=0.2, save_every=1,
            resume="auto", nonfinite="skip", wandb=False, elevation=15.0, learning_rate=4e-3, num_val_samples=1,
            best_min_diversity=0.0)
# Metrics that depend only on the computation (not on timings).
DETERMINISTIC_METRICS = ("val_mrc", "val_kl", "reward_mean", "reward_std", "kl_mean", "kl_std", "approx_kl",
                         "clipfrac", "ratio_dev", "loss", "grad_norm", "skipped", "global_step", "skipped_updates")


def overrides(run_dir, **kw):
    return [f"{k}={v}" for k, v in dict(TINY, run_dir=str(run_dir), **kw).items()]


def run_train(run_dir, **kw):
    assert "RANK" not in os.environ, "these in-process runs must be single-process"
    return train.main([TOY_YAML] + overrides(run_dir, **kw))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt(run_dir, epoch):
    return os.path.join(run_dir, "checkpoints", f"epoch_{epoch:04d}")


def load_ckpt(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    return {"lora": load_file(os.path.join(path, MVDreamPolicy.LORA_FILE)),
            "optimizer": torch.load(os.path.join(path, "optimizer.pt")),
            "rng": torch.load(os.path.join(path, "rng_states.pt"), weights_only=False),
            "state": state}


def assert_same(a, b, where="state"):
    """Exact (bitwise for tensors) equality of nested dicts/lists of tensors and numbers."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, one_thread):
    # The reference run: warm-up epoch 0, then three on-policy updates (epochs 1 to 3; the KL enters the
    # advantage from epoch 2, the first sampled after an update).
    run_dir = tmp_path_factory.mktemp("run_a")
    state = run_train(run_dir, num_epochs=4)
    return run_dir, state


# ----------------------------------------------------------------------------------------------
# 1. Two gloo ranks under torchrun: identical adapters, optimizer state and trackers on both ranks.

WORKER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import train

state = train.main(sys.argv[2:])
torch.save({{"lora": {{k: v.clone() for k, v in state["policy"].lora_state_dict().items()}},
            "optimizer": state["optimizer"].state_dict(),
            "trackers": {{k: t.state_dict() for k, t in state["trackers"].items()}},
            "counters": dict(state["counters"])}},
           os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_ranks_end_identical_and_gradients_are_all_reduced(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT))
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path), TOY_YAML] + overrides(run_dir, num_epochs=2, samples_per_epoch=4)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    # Identical adapters, Adam moments, trackers and counters on both ranks.
    assert_same(r0["lora"], r1["lora"], "lora")
    assert_same(r0["optimizer"], r1["optimizer"], "optimizer")
    assert_same(r0["trackers"], r1["trackers"], "trackers")
    assert r0["counters"] == r1["counters"] and r0["counters"]["global_step"] == 1

    # The ranks sampled different data: every gathered reward of the 2 epochs x 2 ranks x 2 samples is distinct
    # (same prompts/noise on both ranks would duplicate them). So equal weights after the update mean the
    # gradients were all-reduced, not merely equal by construction.
    values = [v for buf in r0["trackers"]["reward"]["buffers"].values() for v in buf]
    assert len(values) == 2 * 2 * 2 and len(set(values)) == len(values)

    # The update happened: LoRA up-projections start at 0 (policy == reference, epoch 0's checkpoint) and
    # every adapter pair moved.
    init = load_file(os.path.join(ckpt(run_dir, 0), MVDreamPolicy.LORA_FILE))
    final = r0["lora"]  # both "unet."-prefixed (diffusers' LoRA file format)
    assert set(init) == set(final)
    ups = [k for k in init if "lora_B" in k]
    assert ups and all(torch.count_nonzero(init[k]) == 0 for k in ups)
    assert all(torch.count_nonzero(final[k]) > 0 for k in ups)

    # Rank 0's checkpoint is rank 0's in-memory state.
    saved = load_ckpt(ckpt(run_dir, 1))
    assert_same(saved["lora"], final, "saved lora")
    assert_same(saved["state"]["trackers"], r0["trackers"], "saved trackers")
    assert_same(saved["optimizer"], r0["optimizer"], "saved optimizer")
    assert len(saved["rng"]) == 2  # one RNG record per rank

    # The first update is on-policy through the DDP wrapper as well, and the logged loss is the mean over
    # both ranks' samples of -A (A from the gathered rewards: per-prompt z-scores over all 4 samples).
    m = read_metrics(run_dir)
    assert [r["epoch"] for r in m] == [0, 1]
    assert m[1]["ratio_dev_max"] == 0.0 and m[1]["clipfrac"] == 0.0
    cfg = train.load_config(TOY_YAML, overrides(run_dir, samples_per_epoch=4))
    prompts = train.load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    plan = batch_plan(cfg, 2, len(prompts))
    e1 = [p for r in range(2) for p in prompt_sources.epoch_prompts(cfg, prompts, 1, r, 2, plan)]
    assert r0["trackers"]["kl"]["buffers"] == {}  # the policy had not moved before epoch 1: no KL yet
    adv = hand_advantages(r0["trackers"], e1, 0.0)
    assert m[1]["loss"] == pytest.approx(-float(np.mean(adv)), rel=1e-4, abs=1e-6)
    assert abs(np.mean(adv[:2]) - np.mean(adv)) > 1e-3  # rank 0's own mean would differ

    # One rank with the same totals runs the same algorithm: the same trackers (the same samples, whose noise
    # depends on the sample, not the rank) and, after the update, the same adapters up to summation order.
    one = run_train(tmp_path / "one_rank", num_epochs=2, samples_per_epoch=4)
    assert_same({k: t.state_dict() for k, t in one["trackers"].items()}, r0["trackers"], "trackers (1 vs 2 ranks)")
    # (Adam's first step is ~lr x sign(gradient): an element whose gradient is ~0 may move differently when
    # the two ranks' gradients are summed in another order, so: all within one step, nearly all identical)
    diff = torch.cat([(v - r0["lora"][k]).abs().flatten() for k, v in one["policy"].lora_state_dict().items()])
    assert diff.max() <= 3e-4 and (diff > 1e-6).float().mean() < 0.01
    assert read_metrics(tmp_path / "one_rank")[1]["loss"] == pytest.approx(m[1]["loss"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. Exact resume: 3 epochs == (2 epochs, stop, resume, 1 epoch), resuming after an update so that the
#    Adam moments, the step count and the trackers must all be restored. ("2 epochs == 1 epoch, stop,
#    resume, 1 epoch", a resume after the warm-up, is test_restart_after_crash_mid_save_redoes_the_epoch_once.)

def test_resume_is_bit_exact(run_a, tmp_path):
    dir_a, _ = run_a
    dir_b = tmp_path / "run_b"
    run_train(dir_b, num_epochs=2)
    mid = load_ckpt(ckpt(dir_b, 1))
    assert mid["optimizer"]["state"] and all(int(s["step"]) == 1 for s in mid["optimizer"]["state"].values())
    state_b = run_train(dir_b, num_epochs=4)
    assert state_b["counters"]["global_step"] == 3 and state_b["counters"]["skipped_updates"] == 0

    a, b = load_ckpt(ckpt(dir_a, 3)), load_ckpt(ckpt(dir_b, 3))
    assert_same(a["lora"], b["lora"], "lora")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    # best/ bookkeeping is left out: B's first run also validated at its last epoch (1), which A never did
    drop = ("best_epoch", "best_val_mrc")
    a["state"]["counters"] = {k: v for k, v in a["state"]["counters"].items() if k not in drop}
    b["state"]["counters"] = {k: v for k, v in b["state"]["counters"].items() if k not in drop}
    for key in ("epoch", "counters", "trackers"):
        assert_same(a["state"][key], b["state"][key], key)
    assert json.dumps(a["state"]["trackers"]) == json.dumps(b["state"]["trackers"])
    assert torch.equal(torch.tensor(a["rng"][0]["torch"]), torch.tensor(b["rng"][0]["torch"]))
    # The logged numbers of the resumed epoch match too, and no epoch is logged twice.
    ma, mb = read_metrics(dir_a), read_metrics(dir_b)
    assert [r["epoch"] for r in mb] == [0, 1, 2, 3]
    for ra, rb in zip(ma, mb):
        assert ("loss" in ra) == ("loss" in rb)
        for k in DETERMINISTIC_METRICS:
            if k in ra and k in rb:  # (B's first run also validated at its last epoch, 1)
                assert ra[k] == rb[k], (ra["epoch"], k)
    assert ma[3]["loss"] == mb[3]["loss"] and ma[3]["val_mrc"] == mb[3]["val_mrc"]


# ----------------------------------------------------------------------------------------------
# 3. The saved LoRA file reproduces the trained policy exactly, through our loader and through diffusers'.

def _policy_inputs(policy):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, policy.num_views, *policy.latent_shape, generator=g)
    return x, torch.tensor([999, 421]), policy.encode_prompts(world.train_prompts()[:2])


def test_saved_lora_reproduces_trained_policy(run_a):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    dir_a, state = run_a
    trained = state["policy"]
    path = ckpt(dir_a, 3)
    x, t, emb = _policy_inputs(trained)

    def out(policy):
        with torch.no_grad():
            return policy(x, t, emb, 5.0)

    want = out(trained)
    def base():  # what the run built before its adapters: same seed -> same base weights, same cameras
        return MVDreamPolicy.tiny(vocab=world.VOCAB, seed=TINY["seed"], elevation=TINY["elevation"])

    assert not torch.equal(out(base()), want)  # the adapters matter
    fresh = base()
    fresh.load_lora(path)
    assert fresh.lora_config.r == 4 and fresh.lora_config.lora_alpha == 8.0
    assert torch.equal(out(fresh), want)
    assert_same(fresh.lora_state_dict(), trained.lora_state_dict(), "lora")

    # A wrong alpha (scale 1 instead of 2) would be visible: the comparison above is sensitive to it.
    wrong = base()
    wrong.load_lora(dict(load_file(os.path.join(path, MVDreamPolicy.LORA_FILE))), alpha=4.0)
    assert not torch.equal(out(wrong), want)

    # diffusers reads the file (keys "unet.<peft name>", alpha in the header) into a plain UNet.
    sd, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in sd)
    via_diffusers = base()
    via_diffusers.unet.load_lora_adapter(sd, prefix="unet", metadata=meta)
    assert torch.equal(out(via_diffusers), want)


# ----------------------------------------------------------------------------------------------
# 4. Pure on-policy: at every update of a pure on-policy run the importance ratio is exactly 1 (the training
#    forward has the sampling forward's shape and program), nothing is clipped.

def test_first_update_is_on_policy(run_a):
    dir_a, _ = run_a
    m = read_metrics(dir_a)
    assert [r["epoch"] for r in m] == [0, 1, 2, 3]
    assert "ratio_dev" not in m[0]  # epoch 0 is the warm-up: no update
    for r in m[1:]:  # every update of a pure on-policy run
        assert r["ratio_dev_max"] == 0.0 and r["clipfrac"] == 0.0 and r["approx_kl"] == 0.0
        # the training forward reproduces the log-prob stored at sampling exactly (fp32 CPU kernels do not depend
        # on the batch): stored transitions, timesteps and embeddings are aligned after the shuffle
        assert r["logp_replay_err"] == 0.0
        assert r["skipped"] == 0 and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert m[3]["global_step"] == 3


def test_fused_lora_run_is_on_policy_and_follows_the_peft_run(run_a, tmp_path):
    # fused_lora (config.yaml's setting; support/lora_kernel.py): each LoRA layer as one GEMM with a hand-written
    # backward. The same run as run_a (peft's layers) up to fp32 rounding, and exactly on-policy at every update.
    dir_a, state_a = run_a
    state = run_train(tmp_path, num_epochs=4, fused_lora=True)
    lora_layers = [m for m in state["policy"].unet.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(hasattr(m, "_peft_forward") for m in lora_layers)  # fused, not peft's forward
    m, m_a = read_metrics(tmp_path), read_metrics(dir_a)
    for r in m[1:]:
        assert r["ratio_dev_max"] == 0.0 and r["clipfrac"] == 0.0 and r["logp_replay_err"] == 0.0
    for r, r_a in zip(m, m_a):  # (a 1% error in the LoRA scale shifts epoch 2's by 5e-4)
        assert r["reward_mean"] == pytest.approx(r_a["reward_mean"], rel=2e-4)
    init = load_file(os.path.join(ckpt(dir_a, 0), MVDreamPolicy.LORA_FILE))
    final, final_a = (load_file(os.path.join(ckpt(d, 3), MVDreamPolicy.LORA_FILE)) for d in (tmp_path, dir_a))
    # Three Adam steps moved the adapters the same way: measured 0.2% of the move apart (Adam's normalised steps
    # amplify rounding where a gradient is near 0); a 1% error in the LoRA scale puts them 10% apart.
    diff, moved = (torch.stack([(x[k] - y[k]).norm() for k in init]).norm() for x, y in ((final, final_a),
                                                                                        (final_a, init)))
    assert moved > 0 and diff <= 0.01 * moved


def test_saved_config_reloads_to_the_same_config(run_a):
    dir_a, _ = run_a
    # The resolved config next to the checkpoints is itself a valid config (e.g. "no" stays a string).
    assert train.load_config(str(dir_a / "config.yaml")) == train.load_config(TOY_YAML, overrides(dir_a, num_epochs=4))


# ----------------------------------------------------------------------------------------------
# 5. The advantage actually used: loss of an on-policy update = -mean(clip(z_reward - 0.2 z_KL)), with the
#    z-scores recomputed here from the rewards and KLs the run stored in its trackers.

def _zscore(value, history):
    # per-prompt z-score (stat_min_count 1: always the prompt's own buffer), population std + 1e-6
    return (value - np.mean(history)) / (np.std(history) + 1e-6)


def hand_advantages(trackers, last_prompts, coeff):
    """A = clip(z_reward - coeff * z_KL, -5, 5) for the samples of a run's last epoch (global sample order),
    from the rewards and KLs its trackers (state dicts) hold in arrival order; with buffer 8 none was dropped,
    so the last epoch's values are each prompt's last ones and its z-scores use the whole buffer. The KL
    tracker only holds epochs sampled after the first update (coeff 0 before)."""
    z = []
    for pos, p in enumerate(last_prompts):
        n_p, i_p = last_prompts.count(p), last_prompts[:pos].count(p)
        r_buf, k_buf = trackers["reward"]["buffers"][p], trackers["kl"]["buffers"].get(p, [])
        assert len(r_buf) < 8 and len(k_buf) < 8
        r = r_buf[len(r_buf) - n_p + i_p]
        z_k = _zscore(k_buf[len(k_buf) - n_p + i_p], k_buf) if coeff else 0.0
        z.append((_zscore(r, r_buf), z_k))
    z_r, z_k = np.array(z).T
    return np.clip(z_r - coeff * z_k, -5, 5)


def test_loss_uses_z_reward_minus_02_z_kl(run_a):
    dir_a, state = run_a
    cfg = train.load_config(TOY_YAML, overrides(dir_a, num_epochs=4))
    prompts = train.load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    e3 = prompt_sources.epoch_prompts(cfg, prompts, 3, 0, 1, batch_plan(cfg, 1, 2))  # epoch 3's, in sample order
    trackers = {k: t.state_dict() for k, t in state["trackers"].items()}
    # On-policy (ratio 1 up to 1e-5, test 4): loss = mean over samples of -A.
    loss = read_metrics(dir_a)[3]["loss"]
    want = -float(np.mean(hand_advantages(trackers, e3, 0.2)))
    assert loss == pytest.approx(want, rel=1e-4, abs=1e-6)
    # The KL term is material here (the check would catch a missing or mis-weighted KL).
    assert abs(-float(np.mean(hand_advantages(trackers, e3, 0.0))) - want) > 1e-2


# ----------------------------------------------------------------------------------------------
# 6. Config errors name their key.

def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, error, words", [
    ("num_epoch: 3\n", KeyError, ["num_epoch", "num_epochs"]),
    ("num_epochs: ten\n", TypeError, ["num_epochs", "int"]),
    ("num_epochs: true\n", TypeError, ["num_epochs"]),
    ("learning_rate: fast\n", TypeError, ["learning_rate", "float"]),
    ("mixed_precision: fp16\n", ValueError, ["mixed_precision", "bf16"]),
    ("mixed_precision: no\n", TypeError, ["mixed_precision", "quote"]),  # YAML 1.1: unquoted no is False
    ("nonfinite: ignore\n", ValueError, ["nonfinite", "skip"]),
    ("stat_min_count: 5\nstat_buffer_size: 4\n", ValueError, ["stat_min_count", "stat_buffer_size"]),
    ("num_steps: 0\n", ValueError, ["num_steps"]),
    ("eta: 0.0\n", ValueError, ["eta"]),
    ("samples_per_epoch: 30\nupdates_per_epoch: 4\n", ValueError, ["samples_per_epoch", "updates_per_epoch"]),
    ("samples_per_epoch: 0\n", ValueError, ["samples_per_epoch"]),
    ("train_batch_size: 4\n", KeyError, ["train_batch_size", "samples_per_epoch", "micro_batch_size"]),
    ("timestep_fraction: 1.5\n", ValueError, ["timestep_fraction"]),
    ("kl_mean_coeff: 0.1\nkl_penalty: false\n", ValueError, ["kl_mean_coeff", "kl_penalty"]),
    ("kl_target: 0.01\n", ValueError, ["kl_target", "kl_mean_coeff"]),
    ("kl_mean_coeff: -1.0\n", ValueError, ["kl_mean_coeff", ">= 0"]),
    ("- a list\n", ValueError, ["mapping"]),
])
def test_config_errors_name_the_key(tmp_path, text, error, words):
    with pytest.raises(error) as e:
        train.load_config(_write(tmp_path, text))
    for w in words:
        assert w in str(e.value)


def test_config_loads_and_overrides(tmp_path):
    cfg = train.load_config(TOY_YAML, ["num_epochs=2", "learning_rate=1e-4", "run_dir=/tmp/x", "adam_epsilon=1e-8"])
    assert cfg.num_epochs == 2 and cfg.run_dir == "/tmp/x"
    # String keys take override text as typed (YAML 1.1 would read no as False).
    assert train.load_config(TOY_YAML, ["mixed_precision=no"]).mixed_precision == "no"
    assert train.load_config(TOY_YAML, ["mixed_precision=bf16", "nonfinite=stop"]).nonfinite == "stop"
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; float keys accept it as the number it is.
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float) and cfg.adam_epsilon == 1e-8
    assert train.load_config(_write(tmp_path, "clip_range: 1e-4\nlearning_rate: 3\n")).learning_rate == 3.0
    with pytest.raises(KeyError, match="nonsense"):
        train.load_config(TOY_YAML, ["nonsense=1"])
    with pytest.raises(ValueError, match="key=value"):
        train.load_config(TOY_YAML, ["num_epochs"])
    with pytest.raises(FileNotFoundError, match="'resume'"):
        train.load_config(TOY_YAML, [f"resume={tmp_path / 'checkpoints' / 'epoch_0003'}"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        train.load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(TypeError, match="seed"):
        train.load_config(TOY_YAML, ["seed=1e3"])  # a float-looking string is not an int


# ----------------------------------------------------------------------------------------------
# 7. Non-finite loss or gradient: skipped (and reported) or stopped, decided the same on every rank.

VOCAB = ["a", "red", "blue", "cube", "ball"]


def _tiny_setup(seed=0):
    policy = MVDreamPolicy.tiny(VOCAB, seed=seed)
    torch.manual_seed(seed)
    policy.add_lora(4, 4.0)
    with torch.no_grad():  # non-zero up-projections, so every LoRA parameter gets a gradient
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(1))
    traj = sample_trajectories(policy, ["a red cube", "a blue ball"], num_steps=2, guidance_scale=5.0,
                               generator=torch.Generator().manual_seed(seed), with_reference=True)
    samples = {k: traj[k] for k in train.TRAIN_KEYS}
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    plan = BatchPlan(world_size=1, samples_per_epoch=2, updates_per_epoch=1, micro_batch_size=2,
                     num_steps=2).validate()
    return policy, samples, params, optimizer, plan


def _update(policy, samples, adv, optimizer, plan, nonfinite):
    return ppo_update(policy, policy, samples, adv, optimizer, plan, eta=1.0, guidance_scale=5.0,
                      train_cfg=True, clip_range=1e-4, adv_clip_max=5.0, max_grad_norm=1.0,
                      generator=torch.Generator().manual_seed(0), nonfinite=nonfinite)


def test_nonfinite_skip_and_stop():
    policy, samples, params, optimizer, plan = _tiny_setup()
    before = [p.detach().clone() for p in params]
    # NaN advantage -> NaN loss: skipped (info "skipped" = 1, which train.py sums into skipped_updates), nothing
    # moved, no optimizer state, gradients cleared.
    infos = _update(policy, samples, torch.tensor([float("nan"), 1.0]), optimizer, plan, "skip")
    assert [i["skipped"] for i in infos] == [1]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not optimizer.state and all(p.grad is None for p in params)
    # Finite loss, non-finite gradient (one adapter's gradient poisoned): also skipped.
    handle = params[0].register_hook(lambda g: g * float("inf"))
    infos = _update(policy, samples, torch.tensor([1.0, -1.0]), optimizer, plan, "skip")
    handle.remove()
    assert infos[0]["skipped"] == 1 and math.isfinite(infos[0]["loss"]) and not math.isfinite(infos[0]["grad_norm"])
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not optimizer.state
    # nonfinite: stop raises before the optimizer step.
    with pytest.raises(FloatingPointError, match="nonfinite"):
        _update(policy, samples, torch.tensor([1.0, float("nan")]), optimizer, plan, "stop")
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not optimizer.state
    assert all(p.grad is None for p in params)  # no stale NaN gradients left for the next update
    # Control: the same batch with finite advantages does update (the skips above were the guard's doing).
    infos = _update(policy, samples, torch.tensor([1.0, -1.0]), optimizer, plan, "skip")
    assert infos[0]["skipped"] == 0 and not all(torch.equal(p, b) for p, b in zip(params, before))


def _nonfinite_rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        policy, samples, params, optimizer, plan = _tiny_setup()
        plan = BatchPlan(world_size=world, samples_per_epoch=2 * world, updates_per_epoch=1, micro_batch_size=2,
                         num_steps=2).validate()
        before = [p.detach().clone() for p in params]
        # Only rank 1 sees a NaN; no DDP here, so rank 0's own gradient is finite: only the cross-rank
        # decision can make it skip.
        adv = torch.tensor([float("nan"), 1.0]) if rank == 1 else torch.tensor([1.0, -1.0])
        infos = _update(policy, samples, adv, optimizer, plan, "skip")
        moved = not all(torch.equal(p, b) for p, b in zip(params, before))
        torch.save({"skipped": infos[0]["skipped"], "moved": moved, "grad_norm": infos[0]["grad_norm"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nonfinite_skip_is_decided_on_every_rank(tmp_path):
    mp.spawn(_nonfinite_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert math.isfinite(r0["grad_norm"]) and not math.isfinite(r1["grad_norm"])  # (no DDP: local gradients)
    assert r0["skipped"] == r1["skipped"] == 1 and not r0["moved"] and not r1["moved"]


# ----------------------------------------------------------------------------------------------
# 8. Checkpoint atomicity: only complete epoch directories count.

def test_latest_checkpoint_ignores_incomplete(tmp_path):
    cfg = train.load_config(TOY_YAML, [f"run_dir={tmp_path}"])
    root = tmp_path / "checkpoints"
    assert checkpoint.latest_checkpoint(cfg) is None
    for name, complete in [("epoch_0001", True), ("epoch_0002", True), ("epoch_0003", False),
                           (".tmp_epoch_0004", True), ("epoch_0005.old", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    assert checkpoint.latest_checkpoint(cfg) == str(root / "epoch_0002")
    # Epoch numbers past the 4-digit padding still sort numerically.
    for name in ("epoch_9999", "epoch_10000"):
        (root / name).mkdir()
        (root / name / "trainer_state.json").write_text("{}")
    assert checkpoint.latest_checkpoint(cfg) == str(root / "epoch_10000")


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    # A real save whose trainer_state.json write fails half-way (a counter that is not JSON): the temporary
    # directory is left behind with a partial marker file and the previous checkpoint stays the newest.
    cfg = train.load_config(TOY_YAML, [f"run_dir={tmp_path}", "stat_min_count=1", "stat_buffer_size=4"])
    policy, _, params, optimizer, _ = _tiny_setup()
    trackers = {"reward": PerPromptStatTracker(4, 1), "kl": PerPromptStatTracker(4, 1)}
    trackers["reward"].update(["a red cube"], [0.5])
    checkpoint.save_checkpoint(cfg, 0, policy, optimizer, trackers, {"global_step": 0}, rank=0)
    assert checkpoint.latest_checkpoint(cfg) == ckpt(tmp_path, 0)
    with pytest.raises(TypeError):
        checkpoint.save_checkpoint(cfg, 1, policy, optimizer, trackers, {"global_step": torch.tensor(1)}, rank=0)
    assert os.path.isfile(tmp_path / "checkpoints" / ".tmp_epoch_0001" / "trainer_state.json")
    assert checkpoint.latest_checkpoint(cfg) == ckpt(tmp_path, 0)
    # The complete checkpoint loads back into a fresh setup.
    policy2, _, _, optimizer2, _ = _tiny_setup(seed=1)
    trackers2 = {"reward": PerPromptStatTracker(4, 1), "kl": PerPromptStatTracker(4, 1)}
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(cfg), policy2, optimizer2, trackers2, rank=0)
    assert state["epoch"] == 0 and trackers2["reward"].state_dict() == trackers["reward"].state_dict()
    assert_same(policy2.lora_state_dict(), policy.lora_state_dict(), "lora")


# ----------------------------------------------------------------------------------------------
# The policy is conditioned on the cameras the reward reconstructs at (config key elevation).

def test_policy_cameras_follow_config_elevation(tmp_path):
    from mvdream import get_camera
    cfg = train.load_config(TOY_YAML, overrides(tmp_path, elevation=0.0))
    policy, reward_fn = train.build_models(cfg, torch.device("cpu"))
    assert policy.elevation == reward_fn.elevation == 0.0
    assert torch.equal(policy.cameras, get_camera(4, 0.0))
    # A saved policy trained at another elevation is refused with the key named.
    MVDreamPolicy.tiny(VOCAB, seed=0, elevation=15.0).save_pretrained(tmp_path / "policy")
    cfg = train.load_config(TOY_YAML, overrides(tmp_path, elevation=0.0, random_init=False,
                                                policy=tmp_path / "policy"))
    with pytest.raises(ValueError, match="'elevation' is 0.0.*trained at elevation 15.0"):
        train.build_models(cfg, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# A crash after an epoch was logged but before its checkpoint was complete: the restart redoes the epoch from
# the previous checkpoint, bit-exactly, and logs it once.

def test_restart_after_crash_mid_save_redoes_the_epoch_once(run_a, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    dir_a, _ = run_a
    dir_c = tmp_path / "run_c"
    run_train(dir_c, num_epochs=2)
    os.remove(os.path.join(ckpt(dir_c, 1), "trainer_state.json"))  # the marker is written last
    assert checkpoint.latest_checkpoint(train.load_config(TOY_YAML, overrides(dir_c))) == ckpt(dir_c, 0)
    run_train(dir_c, num_epochs=2)
    assert [r["epoch"] for r in read_metrics(dir_c)] == [0, 1]
    assert read_metrics(dir_c)[1]["loss"] == read_metrics(dir_a)[1]["loss"]
    events = EventAccumulator(str(dir_c / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1]
    a, c = load_ckpt(ckpt(dir_a, 1)), load_ckpt(ckpt(dir_c, 1))
    assert_same(a["lora"], c["lora"], "lora")
    assert_same(a["optimizer"], c["optimizer"], "optimizer")
    assert_same(a["state"]["trackers"], c["state"]["trackers"], "trackers")


# ----------------------------------------------------------------------------------------------
# Validation runs after the update (and once before the first): the last validation scores the final LoRA.

def test_validation_scores_the_policy_after_the_epochs_update(run_a):
    dir_a, state = run_a
    cfg = train.load_config(TOY_YAML, overrides(dir_a, num_epochs=4))
    m = read_metrics(dir_a)
    assert [r["epoch"] for r in m if "val_mrc" in r] == [0, 3]  # epoch 0 (the start) and the last
    policy, reward_fn = train.build_models(cfg, torch.device("cpu"))  # the starting policy (LoRA up = 0)
    plan = batch_plan(cfg, 1, cfg.num_train_prompts)
    val_prompts = train.load_prompts(cfg.val_prompts, cfg.num_val_prompts)
    logger = type("NoLog", (), {"grid": lambda *a: None})()

    def val():
        return train.validate(cfg, policy, reward_fn, val_prompts, plan, 0, 1, train.partial(train.devices.autocast,
                              torch.device("cpu"), False), logger, 0)
    assert val()["val_mrc"] == m[0]["val_mrc"] and m[0]["val_kl"] == 0.0
    policy.load_lora(ckpt(dir_a, 3))  # the LoRA after epoch 3's update
    assert val() == {k: m[3][k] for k in ("val_mrc", "val_kl", "val_fidelity", "val_size_bias")}
    assert m[3]["val_mrc"] != m[0]["val_mrc"]


def test_best_checkpoint_rule_and_directory(run_a, tmp_path):
    dir_a, _ = run_a
    with open(os.path.join(dir_a, "checkpoints", "best", "best.json")) as f:
        best = json.load(f)
    vals = [r for r in read_metrics(dir_a) if "val_mrc" in r]
    # the rule replayed over the run's own logged validations (its config: no KL limit, the toy's fidelity and
    # size conditions) chooses what best/ holds; a lower val MRC can be refused for its fidelity or size drift
    rule = checkpoint.BestCheckpoint(train.load_config(os.path.join(dir_a, "config.yaml")), {})
    for r in vals:
        rule.consider(r["epoch"], dict(r), policy=None, rank=1)  # a rank other than 0 chooses but writes nothing
    assert best["epoch"] == rule.counters["best_epoch"]
    drifted = [r for r in vals if abs(r["val_size_bias"] - vals[0]["val_size_bias"]) > 0.05
               and abs(r["val_size_bias"]) > abs(vals[0]["val_size_bias"])]
    assert best["epoch"] == min([r for r in vals if r not in drifted and r["val_fidelity"] >= vals[0]["val_fidelity"]
                                 - 0.05], key=lambda r: r["val_mrc"])["epoch"]
    assert load_file(os.path.join(dir_a, "checkpoints", "best", MVDreamPolicy.LORA_FILE)).keys() == \
        load_file(os.path.join(ckpt(dir_a, 3), MVDreamPolicy.LORA_FILE)).keys()
    # The rule itself: lower MRC wins only within the KL limit and the fidelity drop.
    cfg = train.load_config(TOY_YAML, overrides(tmp_path, best_max_val_kl=0.01, best_max_fidelity_drop=0.05))
    rule = checkpoint.BestCheckpoint(cfg, {})
    assert rule.qualifies(0, {"val_mrc": 0.5, "val_kl": 0.0, "val_fidelity": 0.80})
    assert rule.qualifies(4, {"val_mrc": 0.4, "val_kl": 0.005, "val_fidelity": 0.76})
    assert not rule.qualifies(8, {"val_mrc": 0.3, "val_kl": 0.02, "val_fidelity": 0.80})  # KL too far
    assert not rule.qualifies(9, {"val_mrc": 0.2, "val_kl": 0.0, "val_fidelity": 0.74})   # lost the prompt
    # ... and, with best_min_diversity, within the diversity kept (a fraction of epoch 0's val diversity)
    cfg = train.load_config(TOY_YAML, overrides(tmp_path, num_val_samples=2, best_min_diversity=0.85))
    rule = checkpoint.BestCheckpoint(cfg, {})
    assert rule.qualifies(0, {"val_mrc": 0.5, "val_kl": 0.0, "val_fidelity": 0.8, "val_diversity": 0.20})
    assert rule.qualifies(4, {"val_mrc": 0.4, "val_kl": 0.0, "val_fidelity": 0.8, "val_diversity": 0.18})
    assert not rule.qualifies(8, {"val_mrc": 0.3, "val_kl": 0.0, "val_fidelity": 0.8, "val_diversity": 0.16})
    with pytest.raises(ValueError, match="'best_min_diversity'.*num_val_samples: 2"):
        train.load_config(TOY_YAML, overrides(tmp_path, num_val_samples=1, best_min_diversity=0.85))


def test_validation_with_two_samples_per_prompt_keeps_sample_0s_noise_and_measures_diversity(tmp_path, one_thread):
    cfg1 = train.load_config(TOY_YAML, overrides(tmp_path))
    cfg2 = train.load_config(TOY_YAML, overrides(tmp_path, num_val_samples=2))
    policy, reward_fn = train.build_models(cfg1, torch.device("cpu"))
    plan = batch_plan(cfg1, 1, cfg1.num_train_prompts)
    val_prompts = train.load_prompts(cfg1.val_prompts, cfg1.num_val_prompts)
    grids = []
    logger = type("Grids", (), {"grid": lambda self, epoch, name, views, captions: grids.append(views)})()
    autocast = train.partial(train.devices.autocast, torch.device("cpu"), False)
    one = train.validate(cfg1, policy, reward_fn, val_prompts, plan, 0, 1, autocast, logger, 0)
    two = train.validate(cfg2, policy, reward_fn, val_prompts, plan, 0, 1, autocast, logger, 0)
    assert "val_diversity" not in one and len(grids[1]) == 2 * len(val_prompts)
    assert torch.equal(grids[1][0::2], grids[0])           # sample 0 of each prompt: the one-sample val's noise
    assert not torch.equal(grids[1][1::2], grids[0])       # sample 1: its own noise
    # diversity by brute force: LPIPS of the two samples of a prompt, view by view
    lpips_model = reward_fn.lpips_model
    d = [lpips_model(grids[1][2 * p, v:v + 1], grids[1][2 * p + 1, v:v + 1], normalize=True).item()
         for p in range(len(val_prompts)) for v in range(4)]
    assert two["val_diversity"] == pytest.approx(sum(d) / len(d), rel=1e-5) and two["val_diversity"] > 0


def test_multi_update_ppo_compares_later_steps_with_the_sampled_log_probs():
    # 2 optimizer steps per epoch (DDPO's multi-update PPO): the first is on-policy by construction (ratio 1), the
    # second compares the moved policy with the stored sampling log-probs (ratio != 1, approx_kl > 0)
    policy, samples, params, optimizer, _ = _tiny_setup()
    plan = BatchPlan(world_size=1, samples_per_epoch=2, updates_per_epoch=2, micro_batch_size=1,
                     num_steps=2).validate()
    infos = _update(policy, samples, torch.tensor([1.0, -1.0]), optimizer, plan, "skip")
    assert len(infos) == 2 and infos[0]["ratio_dev_max"] == 0.0 and infos[0]["approx_kl"] == 0.0
    assert infos[1]["ratio_dev_max"] > 0.0 and infos[1]["approx_kl"] > 0.0


def test_validation_curve_plots_one_panel_per_metric_from_metrics_jsonl(run_a, tmp_path):
    from PIL import Image

    from support.run_log import plot_validation
    dir_a, _ = run_a
    out = plot_validation([dir_a, dir_a], str(tmp_path / "curve.png"))
    assert Image.open(out).size == (3 * 420, 300)  # val_mrc, val_fidelity, val_kl panels side by side
    with pytest.raises(KeyError, match="no 'val_nothing'"):
        plot_validation([dir_a], str(tmp_path / "x.png"), keys=("val_nothing",))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_validation([str(tmp_path)], str(tmp_path / "y.png"))


def test_adaptive_exact_kl_coefficient_follows_the_rule_and_is_checkpointed(tmp_path, one_thread):
    from kl import adapt_kl_coeff
    run_train(tmp_path, num_epochs=4, kl_mean_coeff=0.5, kl_target=1e-9, learning_rate=1e-2)
    m = read_metrics(tmp_path)
    assert m[0]["kl_mean_coeff"] == 0.5 and "kl_step" not in m[0]    # epoch 0: no update
    assert m[1]["kl_step"] == 0 and m[1]["kl_mean_coeff"] == 0.5    # the first update starts at the reference
    for e in (2, 3):                                                # logged after the epoch's update
        assert m[e]["kl_step"] > 0
        assert m[e]["kl_mean_coeff"] == adapt_kl_coeff(m[e - 1]["kl_mean_coeff"], m[e]["kl_step"], 1e-9)
    assert m[3]["kl_mean_coeff"] > 0.5                              # the policy moved: KL above a tiny target
    with open(os.path.join(ckpt(tmp_path, 3), "trainer_state.json")) as f:
        assert json.load(f)["counters"]["kl_mean_coeff"] == m[3]["kl_mean_coeff"]  # a resume continues from it


def test_compile_models_compiles_every_network_of_the_epoch():
    # train.py (compile: true on CUDA) compiles the UNet and both reward networks; the timings are in bench/epoch.py
    from support import compiling
    cfg = train.load_config(os.path.join(ROOT, "toy.yaml"), ["random_init=true"])
    policy, reward_fn = train.build_models(cfg, torch.device("cpu"))
    modules = (policy.unet, policy.vae.decoder, reward_fn.lgm.unet)
    assert all(m._compiled_call_impl is None for m in modules)
    compiling.compile_models(policy, reward_fn)
    assert all(m._compiled_call_impl is not None for m in modules)
