# The shipped toy checkpoints (checkpoints/toy/) and the scripts that make and evaluate them (toy/sft.py, evaluate.py).
# Everything runs the real classes on CPU at the toy size; numbers quoted in comments were measured on this
# 2-core CPU (GPU numbers from the records next to the checkpoints where stated).
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFont
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import reconstruct
import reward
import train
from mvdream import MVDreamPolicy
from sample import sample_trajectories
from support import checkpoint
from support import images
from support.run_log import read_metrics
from support.mvdream_weights import read_vae
from support.diversity import per_prompt_diversity
from support.seeding import make_generator
from toy import fidelity
from toy import sft
from toy import world

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "toy"
# the reward: the first tiny LGM (lgm-tiny, in git history at 533d5a0) trained 1,341 steps more (its record)
SFT_BASE, SFT_LONG, LGM_FILE = CKPT / "sft-base", CKPT / "sft-long", CKPT / "lgm-tiny-v3.safetensors"
VAE_DIR = CKPT / "vae-tiny"
GPU_RUNS = ROOT / "checkpoints" / "toy-gpu-runs"   # the toy-gpu.yaml runs: config, metrics.jsonl, checkpoints/best/
RES = world.TOY.resolution                  # 64
N_GAUSSIANS = 4 * 32 * 32                 # tiny LGM: 4 input views x splat_size^2 pixels -> one Gaussian each


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def alex():
    return reward.load_lpips("alex")      # real pretrained LPIPS-AlexNet (raises if the weights are absent)


@pytest.fixture(scope="module")
def shipped_lgm():
    return reconstruct.LGM.from_pretrained(str(LGM_FILE), config="tiny").requires_grad_(False)


def one_prompt_per_colour():
    # test prompts whose main colours all differ, so swapping a view between two objects is a visible change
    picked = {}
    for p in world.test_prompts():
        picked.setdefault(world.parse_prompt(p).color, p)
    return [picked[c] for c in world.COLORS]


def ground_truth_views(prompts, seed0):
    objs = torch.stack([world.make_object(p, gen(seed0 + i)) for i, p in enumerate(prompts)])
    return world.render_views(objs)         # (B, 4, 3, 64, 64), MVDream view order, toy elevation 15


# ------------------------------------------------------------------------------ 1. shipped checkpoints load

def test_shipped_mvdream_checkpoints_load_strictly_and_sample_at_documented_shapes():
    base, long = MVDreamPolicy.from_pretrained(str(SFT_BASE)), MVDreamPolicy.from_pretrained(str(SFT_LONG))
    for policy, folder in ((base, SFT_BASE), (long, SFT_LONG)):
        assert policy.latent_shape == (4, 16, 16) and policy.image_size == 64
        assert policy.elevation == world.TOY.elevation == 15.0
        assert policy.lora_config is None
        # every tensor of the file is in the model, bit for bit, and the model has nothing else
        on_disk = load_file(folder / "model.safetensors")
        in_model = policy.state_dict()
        assert set(on_disk) == set(in_model)
        assert all(torch.equal(on_disk[k], in_model[k]) for k in on_disk)
        record = json.loads((folder / "sft_record.json").read_text())
        assert record["args"]["model"] == "mvdream" and record["step"] > 0
    # sft-long is the same run continued: same architecture, different weights, later step
    sd_b, sd_l = base.state_dict(), long.state_dict()
    assert [(k, v.shape) for k, v in sd_b.items()] == [(k, v.shape) for k, v in sd_l.items()]
    assert not all(torch.equal(sd_b[k], sd_l[k]) for k in sd_b)
    # "longer SFT": both are EMA snapshots of one run (same arguments but the time budget of the call that wrote
    # it), sft-long at a later step (Carve3D compares 10K with 20K / 100K steps); each record's step is one of the
    # run's --snapshot steps
    records = [json.loads((f / "sft_record.json").read_text()) for f in (SFT_BASE, SFT_LONG)]
    args = [{k: v for k, v in r["args"].items() if k != "max_minutes"} for r in records]
    assert args[0] == args[1] and records[0]["step"] < records[1]["step"]
    snapshot_steps = {int(s.split(":")[0]) for s in records[0]["args"]["snapshot"]}
    assert {r["step"] for r in records} <= snapshot_steps
    # both are latent models on the shipped VAE, which MVDream SFT keeps frozen (stored in fp16), trained on its
    # latents as they are now: shifted by latents_mean, so that the background is 0 (the size-bias fix, mvdream.py)
    vae = load_file(VAE_DIR / "diffusion_pytorch_model.safetensors")
    for sd in (sd_b, sd_l):
        assert all(torch.equal(sd["vae." + k], v.half().float()) for k, v in vae.items())
    shipped_vae = read_vae(VAE_DIR).config
    for policy in (base, long):
        assert policy.vae.config.latents_mean == shipped_vae.latents_mean is not None
        assert policy.vae.config.scaling_factor == shipped_vae.scaling_factor

    for policy in (base, long):
        traj = sample_trajectories(policy, ["a red cube"], num_steps=2, guidance_scale=5.0, generator=gen(0))
        views = traj["views"]
        assert views.shape == (1, 4, 3, 64, 64)
        assert torch.isfinite(views).all() and views.min() >= 0 and views.max() <= 1
        assert traj["latents"].shape == (1, 2, 4, 4, 16, 16)


def shipped_rl_results():
    # every shipped RL result with its own records: (config, run dir with metrics.jsonl, folder with best.json and
    # the LoRA). rl-cpu / rl-gpu: checkpoints/toy/NAME (a run's best/ with its records); the GPU runs: their dirs.
    found = [pytest.param(CKPT / n / "train_config.yaml", CKPT / n, CKPT / n, id=n) for n in ("rl-cpu", "rl-gpu")]
    found += [pytest.param(d / "config.yaml", d, d / "checkpoints" / "best", id=d.name)
              for d in sorted(GPU_RUNS.iterdir()) if d.is_dir()]
    return found


def test_the_gpu_runs_are_shipped_with_their_records():
    runs = [d for d in sorted(GPU_RUNS.iterdir()) if d.is_dir()]
    assert runs, "checkpoints/toy-gpu-runs/ has no run"
    for d in runs:
        assert all((d / f).is_file() for f in ("config.yaml", "metrics.jsonl", "checkpoints/best/best.json",
                                               f"checkpoints/best/{MVDreamPolicy.LORA_FILE}")), d


@pytest.mark.parametrize("config, run_dir, best_dir", shipped_rl_results())
def test_shipped_rl_best_is_what_the_best_rule_picks_from_the_runs_logged_validations(config, run_dir, best_dir):
    # The run's own config (loadable by train.py) fed to support/checkpoint.py's rule, replayed over the validations
    # the run logged, chooses best.json's epoch, and chose so at every validation (each row's logged best_epoch).
    cfg = train.load_config(str(config))
    # trained from the shipped sft-base on the shipped reward model
    assert cfg.policy == str(SFT_BASE.relative_to(ROOT)) and cfg.lgm == str(LGM_FILE.relative_to(ROOT))
    rows = read_metrics(run_dir)
    best = json.loads((best_dir / "best.json").read_text())
    validations = [r for r in rows if "val_mrc" in r]
    assert validations[0]["epoch"] == 0 and best["epoch"] <= rows[-1]["epoch"]
    counters = {}
    rule = checkpoint.BestCheckpoint(cfg, counters)
    for row in validations:
        logged = {k: v for k, v in row.items() if k.startswith("val_") and not k.endswith("_0")}  # not the counters
        rule.consider(row["epoch"], logged, policy=None, rank=1)   # a rank other than 0 chooses but writes no file
        assert counters["best_epoch"] == row["best_epoch"], f"epoch {row['epoch']}"
    assert counters["best_epoch"] == best["epoch"]
    chosen = next(r for r in validations if r["epoch"] == best["epoch"])
    for key in ("val_mrc", "val_kl", "val_fidelity", "val_diversity"):
        assert best["metrics"].get(key) == pytest.approx(chosen.get(key)), key
    # the rule's conditions held at the chosen validation (what the replay relied on)
    assert best["metrics"]["val_fidelity"] >= validations[0]["val_fidelity"] - cfg.best_max_fidelity_drop
    if cfg.best_min_diversity > 0:
        assert best["metrics"]["val_diversity"] >= cfg.best_min_diversity * validations[0]["val_diversity"]


@pytest.mark.parametrize("config, run_dir, best_dir", shipped_rl_results())
def test_shipped_rl_lora_loads_onto_sft_base_and_changes_its_samples(config, run_dir, best_dir):
    cfg = train.load_config(str(config))
    policy = MVDreamPolicy.from_pretrained(str(SFT_BASE))
    policy.load_lora(best_dir / MVDreamPolicy.LORA_FILE)               # strict: every key placed, none missing
    assert (policy.lora_config.r, policy.lora_config.lora_alpha) == (cfg.lora_rank, cfg.lora_alpha)
    on_disk = load_file(best_dir / MVDreamPolicy.LORA_FILE)
    assert len(on_disk) == len(policy.lora_state_dict()) and any(v.abs().max() > 0 for v in on_disk.values())
    traj = sample_trajectories(policy, ["a red cube"], num_steps=3, guidance_scale=5.0, generator=gen(0))
    with policy.disable_adapters():
        base = sample_trajectories(policy, ["a red cube"], num_steps=3, guidance_scale=5.0, generator=gen(0))
    # a best/ chosen at epoch 0 is the starting policy (LoRA up-projections still 0); any later one has moved
    unchanged = json.loads((best_dir / "best.json").read_text())["epoch"] == 0
    assert torch.equal(traj["views"], base["views"]) == unchanged


def test_rl_gpu_is_one_gpu_runs_best_with_that_runs_records():
    # checkpoints/toy/rl-gpu is a copy of one GPU run's best/, with the run's metrics and config: the run whose best/
    # lowered its own val MRC most below its epoch 0 (docs/RESULTS.md), a choice made on validation, not the test set
    lora = (CKPT / "rl-gpu" / MVDreamPolicy.LORA_FILE).read_bytes()
    runs = [d for d in sorted(GPU_RUNS.iterdir()) if d.is_dir() and
            (d / "checkpoints" / "best" / MVDreamPolicy.LORA_FILE).read_bytes() == lora]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (CKPT / "rl-gpu" / "best.json").read_text() == (run / "checkpoints" / "best" / "best.json").read_text()
    assert (CKPT / "rl-gpu" / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    config = lambda p: {k: v for k, v in yaml.safe_load(p.read_text()).items() if k != "run_dir"}  # noqa: E731
    assert config(CKPT / "rl-gpu" / "train_config.yaml") == config(run / "config.yaml")

    def val_gain(d):
        rows = [r for r in read_metrics(d) if "val_mrc" in r]
        best = json.loads((d / "checkpoints" / "best" / "best.json").read_text())
        return rows[0]["val_mrc"] - best["metrics"]["val_mrc"]
    # among the runs of toy-gpu.yaml as it ships (with Carve3D's KL); the runs without KL are the ablation
    with_kl = [d for d in GPU_RUNS.iterdir() if d.is_dir() and train.load_config(str(d / "config.yaml")).kl_penalty]
    assert run == max(with_kl, key=val_gain)


def test_shipped_lgm_loads_strictly_and_reconstructs_4096_gaussians(shipped_lgm):
    cfg = shipped_lgm.config
    assert (cfg.name, cfg.input_size, cfg.splat_size) == ("tiny", 64, 32)
    assert cfg.fovy == world.TOY.fovy and cfg.cam_radius == world.TOY.radius
    on_disk = load_file(LGM_FILE)
    in_model = shipped_lgm.state_dict()
    assert set(on_disk) == set(in_model) and all(torch.equal(on_disk[k], in_model[k]) for k in on_disk)
    # the config stored in the file header and the sibling json agree with "tiny"
    assert reconstruct.LGM.from_pretrained(str(LGM_FILE), config=None).config == cfg
    assert json.loads(LGM_FILE.with_suffix(".json").read_text())["splat_size"] == 32

    views = ground_truth_views(world.test_prompts()[:2], 0)[:, list(reconstruct.MVDREAM_TO_LGM)]  # LGM input order
    cams = reconstruct.standard_cameras(-world.TOY.elevation, world.TOY.radius)
    with torch.no_grad():
        g = shipped_lgm.reconstruct(views, cams)
    assert g.shape == (2, N_GAUSSIANS, 14) and torch.isfinite(g).all()
    assert (g[..., 3] >= 0).all() and (g[..., 3] <= 1).all()                  # activated opacity
    assert torch.allclose(g[..., 7:11].norm(dim=-1), torch.ones(()), atol=1e-4)  # unit quaternions


@pytest.mark.parametrize("tamper", ["drop", "add"])
def test_tampered_mvdream_folder_fails_naming_the_key(tmp_path, tamper):
    folder = tmp_path / "sft-base"
    shutil.copytree(SFT_BASE, folder)
    sd = load_file(folder / "model.safetensors")
    if tamper == "drop":
        key = "unet.conv_in.bias"
        del sd[key]
    else:
        key = "unet.extra_tensor"
        sd[key] = torch.zeros(3)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises((KeyError, RuntimeError), match=key.replace(".", r"\.")):
        MVDreamPolicy.from_pretrained(str(folder))


@pytest.mark.parametrize("tamper", ["drop", "add"])
def test_tampered_lgm_file_fails_naming_the_key(tmp_path, tamper):
    with safe_open(str(LGM_FILE), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if tamper == "drop":
        key = sorted(sd)[len(sd) // 2]
        del sd[key]
    else:
        key = "extra.weight"
        sd[key] = torch.zeros(3)
    bad = tmp_path / "lgm-tampered.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        reconstruct.LGM.from_pretrained(str(bad), config="tiny")


# ------------------------------------------------------------------ 2. the shipped LGM on consistent views

# Threshold for the MRC of ground-truth renders (Carve3D's MRC settings): the shipped LGM stays well below it
# (the test prints its values) and the same architecture untrained lands far above it (checked below).
GT_MRC_MEAN_MAX, GT_MRC_EACH_MAX = 0.25, 0.35


def test_shipped_lgm_mrc_is_low_on_ground_truth_and_rises_when_a_view_is_swapped(shipped_lgm, alex):
    reward_fn = reward.MRCReward(shipped_lgm, alex, elevation=world.TOY.elevation)
    prompts = one_prompt_per_colour()
    for seed0 in (0, 100):
        views = ground_truth_views(prompts, seed0)
        consistent = reward_fn(views)["mrc"]
        swapped = views.clone()
        swapped[:, 1] = views.roll(1, dims=0)[:, 1]    # view 1 of each object <- view 1 of an object of another colour
        inconsistent = reward_fn(swapped)["mrc"]
        print(f"seeds {seed0}+: GT MRC {consistent.tolist()} | one view swapped {inconsistent.tolist()}")
        assert consistent.mean() < GT_MRC_MEAN_MAX and (consistent < GT_MRC_EACH_MAX).all()
        assert (inconsistent > consistent).all()
        assert inconsistent.mean() > consistent.mean() + 0.05

    # the threshold means something: the same architecture untrained is far above it
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = reconstruct.LGM("tiny").eval()
    assert reward.MRCReward(untrained, alex, elevation=world.TOY.elevation)(views)["mrc"].mean() > 2 * GT_MRC_MEAN_MAX


def test_shipped_lgm_loads_strictly_and_records_its_recipe():
    lgm = reconstruct.LGM.from_pretrained(str(LGM_FILE), config=None)
    on_disk = load_file(LGM_FILE)
    assert lgm.config.name == "tiny" and set(on_disk) == set(lgm.state_dict())
    record = json.loads(LGM_FILE.with_suffix(".record.json").read_text())
    args = record["args"]
    assert args["model"] == "lgm" and args["init"].endswith("lgm-tiny-v2.safetensors")  # the LGM it continued
    assert args["scale_range"] == [0.7, 1.3] and args["vae_inputs"] == "checkpoints/toy/vae-tiny"  # toy/sft.py
    assert 0 < record["step"] <= record["args"]["steps"]   # --max-minutes may stop it early: the step it saved


def test_shipped_lgm_sees_inconsistency_more_than_simplicity(shipped_lgm, alex):
    # What RL exploits: the reward should rise more for 4 views that are not one object than it falls for an
    # object without its part; otherwise dropping parts pays (it did with the first tiny LGM, in git history).
    prompts = [p for p in world.test_prompts() if world.parse_prompt(p).has_part][::37][:12]
    objs = lambda ps, k: torch.stack([world.make_object(p, make_generator("cpu", 0, "probe", i, k))  # noqa: E731
                                      for i, p in enumerate(ps)])
    consistent = world.render_views(objs(prompts, 0))
    independent = torch.stack([world.render_views(objs(prompts, k))[:, k] for k in range(4)], 1)  # view k: instance k
    no_part = world.render_views(objs([p.split(" with ")[0] for p in prompts], 0))
    r = reward.MRCReward(shipped_lgm, alex, elevation=world.TOY.elevation)
    c, i, n = [r(v)["mrc"].mean().item() for v in (consistent, independent, no_part)]
    print(f"one object {c:.4f}, 4 instances {i:.4f}, without the part {n:.4f}")
    assert i - c > c - n and i > c > n     # inconsistency costs more than a dropped part gains


# -------------------------------------------------------------------------------------- 3. evaluate.py

def eval_args(out, *what, num_prompts=2, seeds=2):
    return [*what, "--num-prompts", str(num_prompts), "--seeds", str(seeds), "--num-steps", "3", "--device", "cpu",
            "--lgm", str(LGM_FILE), "--seed", "0", "--out", str(out)]


def check_metrics_and_grid(out, num_prompts=2, seeds=2):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_prompts"] == num_prompts and metrics["samples_per_prompt"] == seeds
    assert math.isfinite(metrics["mrc_mean"]) and metrics["mrc_mean"] >= 0 and metrics["mrc_std"] >= 0
    assert 0 <= metrics["fidelity_mean"] <= 1 and metrics["size_spread"] >= 0
    assert math.isfinite(metrics["diversity"]) and metrics["diversity"] >= 0
    grid = Image.open(out / "grid.png")
    # one row per prompt (its first sample), each under a caption strip of at least one line
    assert grid.mode == "RGB" and grid.width == 4 * RES and grid.height % num_prompts == 0
    assert grid.height // num_prompts - RES >= images.caption_line_px()
    return metrics, torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)


def grid_views(grid, row, rows):
    # (4, 3, 64, 64) uint8: the 4 views pasted in row `row` of support.images.save_grid's layout (rows of equal
    # height, each a caption strip over the views)
    height = grid.shape[1] // rows
    top = row * height + height - RES
    return torch.stack([grid[:, top:top + RES, j * RES:(j + 1) * RES] for j in range(4)])


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "sft-base"
    evaluate.main(eval_args(out, "--checkpoint", str(SFT_BASE)))
    return out


def test_evaluate_checkpoint_writes_metrics_and_grid_in_range(base_eval):
    metrics, _ = check_metrics_and_grid(base_eval)
    assert metrics["source"] == {"checkpoint": str(SFT_BASE), "lora": None}
    assert metrics["options"]["num_steps"] == 3


def test_evaluate_ground_truth_matches_an_independent_recomputation(tmp_path, shipped_lgm, alex):
    out = tmp_path / "gt"
    evaluate.main(eval_args(out, "--ground-truth"))
    metrics, grid = check_metrics_and_grid(out)
    print("GT metrics", {k: v for k, v in metrics.items() if k != "options"})
    assert metrics["source"] == {"ground_truth": True, "through_vae": None}
    assert metrics["fidelity_mean"] > 0.8                                    # measured 1.00

    # recompute from the documented recipe: prompts spread over the test list, object (i, s) seeded by
    # evaluate's fixed-noise seed (seed, i, s), rendered at elevation 15; MRC, fidelity, diversity by hand
    prompts = evaluate.load_prompts("toy:test", 2)
    assert prompts == world.test_prompts()[:: len(world.test_prompts()) // 2][:2]
    objs = torch.stack([world.make_object(p, make_generator("cpu", 0, "object", i, s))
                        for i, p in enumerate(prompts) for s in range(2)])
    views = world.render_views(objs)                                           # (P*S, 4, 3, 64, 64)
    mrc = reward.MRCReward(shipped_lgm, alex, elevation=15.0, fg_threshold=0.8, object_size=0.6)(views)["mrc"]
    assert metrics["mrc_mean"] == pytest.approx(mrc.mean().item(), abs=1e-5)
    fid = fidelity.fidelity(views, [p for p in prompts for _ in range(2)])
    assert metrics["fidelity_mean"] == pytest.approx(fid.mean().item(), abs=1e-6)
    spread = fidelity.size_spread(views, [p for p in prompts for _ in range(2)])
    assert metrics["size_spread"] == pytest.approx(spread.mean().item(), abs=1e-6) and metrics["size_spread"] < 0.2
    per = metrics["per_sample"]
    for key, ref in (("mrc", mrc), ("fidelity", fid), ("size_spread", spread)):
        assert per[key] == pytest.approx(ref.tolist(), abs=1e-5)
    m, s = mrc.view(2, 2).double().numpy(), spread.view(2, 2).double().numpy()
    centred = [x - x.mean(1, keepdims=True) for x in (m, s)]
    assert metrics["mrc_vs_spread"] == pytest.approx(np.corrcoef(centred[0].ravel(), centred[1].ravel())[0, 1], abs=1e-6)
    with torch.no_grad():
        div = torch.stack([alex(views[2 * i + 0], views[2 * i + 1], normalize=True).flatten() for i in range(2)])
    assert metrics["diversity"] == pytest.approx(div.mean().item(), abs=1e-5)
    # the grid shows the first sample of each prompt
    for row in range(2):
        expect = (views[2 * row] * 255).round().to(torch.uint8)
        assert (grid_views(grid, row, 2).int() - expect.int()).abs().max() <= 1


def test_evaluate_ground_truth_through_the_vae_is_what_the_policy_decodes_from_encoded_renders(tmp_path, shipped_lgm, alex):
    out = tmp_path / "gt-vae"
    evaluate.main(eval_args(out, "--ground-truth", "--through-vae", str(VAE_DIR)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"] == {"ground_truth": True, "through_vae": str(VAE_DIR)}
    # independent path: the shipped policy's own encode (posterior mean x scaling factor) and decode (/ factor)
    prompts = evaluate.load_prompts("toy:test", 2)
    objs = torch.stack([world.make_object(p, make_generator("cpu", 0, "object", i, s))
                        for i, p in enumerate(prompts) for s in range(2)])
    views = world.render_views(objs)
    policy = MVDreamPolicy.from_pretrained(str(SFT_BASE))                   # its VAE is vae-tiny in fp16 storage
    policy.vae.load_state_dict(load_file(VAE_DIR / "diffusion_pytorch_model.safetensors"))
    with torch.no_grad():
        roundtrip = policy.decode(policy.encode(views))
    assert (roundtrip - views).abs().mean() > 1e-3                          # the round trip is not the identity
    mrc = reward.MRCReward(shipped_lgm, alex, elevation=15.0, fg_threshold=0.8, object_size=0.6)(roundtrip)["mrc"]
    assert metrics["mrc_mean"] == pytest.approx(mrc.mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="--through-vae applies to --ground-truth"):
        evaluate.main(eval_args(tmp_path / "x", "--checkpoint", str(SFT_BASE), "--through-vae", str(VAE_DIR)))


def test_evaluate_with_a_lora_changes_the_samples(tmp_path, base_eval, fill_lora_up):
    policy = MVDreamPolicy.from_pretrained(str(SFT_BASE))
    policy.add_lora(4, 4)
    fill_lora_up(policy, 0.05, 0)               # lora_B starts at 0 (policy == base): make it a real change
    lora_dir = tmp_path / "lora"
    policy.save_lora(lora_dir)

    out = tmp_path / "with-lora"
    evaluate.main(eval_args(out, "--checkpoint", str(SFT_BASE), "--lora", str(lora_dir)))
    with_lora, grid_lora = check_metrics_and_grid(out)
    without, grid_base = check_metrics_and_grid(base_eval)
    assert with_lora["source"] == {"checkpoint": str(SFT_BASE), "lora": str(lora_dir)}
    # same fixed noise, different weights -> different samples and figures
    assert (grid_lora.int() - grid_base.int()).abs().float().mean() > 1.0
    assert with_lora["mrc_mean"] != without["mrc_mean"] and with_lora["diversity"] != without["diversity"]


# ------------------------------------------------------------------------------- 4. robustness experiment

# MRC rises with the level only on average: a 1-px shift (shift level 1) raises one object's MRC by
# +0.0014 +- 0.004 (66% of objects go up; CPU, 96 objects), so a handful of objects is not enough. With
# 16 objects and the default seed 0 every step is positive on this CPU (smallest: shift 0->1, +0.003);
# with 8 objects shift 0->1 goes down (-0.0001). Bootstrap over 96 objects: 16 objects are monotone for all
# kinds ~91% of the time, so another seed may fail -- the test pins seed 0.
ROBUSTNESS_OBJECTS = 16


def test_robustness_mrc_increases_with_distortion_level(tmp_path):
    out = tmp_path / "robustness"
    # raw renders only, scale rows at 1.0 only: the distortion rows (tests/test_size.py runs the rest)
    evaluate.main(["--robustness", "--levels", "3", "--num-prompts", str(ROBUSTNESS_OBJECTS), "--seed", "0",
                   "--device", "cpu", "--lgm", str(LGM_FILE), "--out", str(out), "--through-vae", "none",
                   "--scales", "1.0"])
    result = json.loads((out / "robustness.json").read_text())
    assert result["levels"] == [0, 1, 2, 3] and result["num_objects"] == ROBUSTNESS_OBJECTS and "vae" not in result
    mrc = result["raw"]["mrc"]
    assert set(mrc) == {*world.DISTORTIONS, evaluate.CONSISTENT, evaluate.ONE_VIEW}
    print("robustness", json.dumps(mrc))
    level0 = {v[0] for v in mrc.values()}
    assert len(level0) == 1 and 0 < level0.pop() < GT_MRC_MEAN_MAX   # level 0 = the same undistorted views
    for kind in world.DISTORTIONS:
        row = mrc[kind]
        assert all(b > a for a, b in zip(row, row[1:])), f"{kind}: MRC not increasing with level: {row}"
        assert result["raw"]["monotone"][kind] is True
    table = (out / "robustness.md").read_text()
    assert all(f"| {kind} |" in table for kind in world.DISTORTIONS)
    with Image.open(out / "robustness.png") as png:
        assert png.format == "PNG" and png.width >= 400 and png.height >= 300


# ------------------------------------------------------------------------------- 5. evaluate's helpers

def test_within_prompt_correlation_ignores_each_prompts_level():
    # what RL's per-prompt advantages see: only the ranking of a prompt's own samples
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ca, cb = (x - x.mean(1, keepdim=True) for x in (a, b))
    r = evaluate.within_prompt_corr(a, b)
    assert r == pytest.approx(np.corrcoef(ca.flatten().numpy(), cb.flatten().numpy())[0, 1], abs=1e-9)
    offsets = 10 * torch.randn(6, 1, generator=g, dtype=torch.float64)  # a prompt that is easy for both metrics is no evidence
    assert evaluate.within_prompt_corr(a + offsets, b + 3 * offsets) == pytest.approx(r, abs=1e-9)
    assert evaluate.within_prompt_corr(a, 2 * a + 1) == pytest.approx(1.0)
    assert math.isnan(evaluate.within_prompt_corr(a[:, :1], b[:, :1]))


def test_diversity_is_zero_for_identical_samples_and_positive_otherwise(alex):
    diversity = lambda v, m: per_prompt_diversity(v, m).mean().item()  # noqa: E731  (evaluate.py's number)
    views = ground_truth_views(["a red cube", "a blue ball with a green cone on its left"], 0)   # (2, 4, 3, 64, 64)
    same = views[:, None].expand(-1, 3, -1, -1, -1, -1)                                       # 3 identical samples
    assert diversity(same, alex) == 0.0
    other = ground_truth_views(["a red cube", "a blue ball with a green cone on its left"], 50)
    different = torch.stack([views, other], 1)                                                # (P=2, S=2, ...)
    d = diversity(different, alex)
    with torch.no_grad():
        expect = torch.stack([alex(views[i], other[i], normalize=True).mean() for i in range(2)]).mean().item()
    assert d > 0 and d == pytest.approx(expect, abs=1e-6)
    assert math.isnan(diversity(views[:, None], alex))                                        # 1 sample: undefined


def test_line_plot_draws_every_series_titled_and_labelled(tmp_path):
    path = tmp_path / "plot.png"
    fig = images.line_plot(str(path), [0, 1, 2], {"a": [0.1, 0.2, 0.3], "b": [0.3, 0.2, 0.25]}, "level", "MRC",
                           size=(500, 320), title="MRC by level")
    assert Image.open(path).size == (500, 320) and path.stat().st_size > 5000   # a real chart, not a blank file
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("level", "MRC", "MRC by level")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"a", "b"} and all(line.get_marker() == "o" for line in lines.values())
    assert list(lines["b"].get_xdata()) == [0, 1, 2] and list(lines["b"].get_ydata()) == [0.3, 0.2, 0.25]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_line_plot_series_with_their_own_x_values(tmp_path):
    # a dict series is drawn at its own x, sorted: one point at x = 2, not at x = 0
    fig = images.line_plot(str(tmp_path / "plot.png"), [0, 1, 2], {"a": [0.1, 0.2, 0.3], "b": {2: 0.2, 1: 0.1}},
                           "x", "y")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["b"].get_xdata()) == [1, 2] and list(lines["b"].get_ydata()) == [0.1, 0.2]


def test_line_plot_ticks_are_distinct_and_readable_for_a_narrow_range(tmp_path):
    # values within 0.002 of each other (a validation MRC curve): every tick label different, no offset ("+0.09")
    # to add in one's head, integer epochs on x
    fig = images.line_plot(str(tmp_path / "plot.png"), [0, 4, 8, 12, 16, 19],
                           {"run": [0.0972, 0.0973, 0.0978, 0.0976, 0.0963, 0.0958]}, "epoch", "val_mrc")
    ax = fig.axes[0]
    fig.canvas.draw()
    ys = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ys) >= 3 and len(set(ys)) == len(ys) and ax.yaxis.get_offset_text().get_text() == ""
    assert all(float(x.replace("\u2212", "-")).is_integer() for x in xs)


# ------------------------------------------------------------------------------------- 6. toy/sft.py smoke

def test_sft_mvdream_smoke_writes_loadable_snapshot_and_final_checkpoints(tmp_path):
    vae, base, long, log = tmp_path / "vae", tmp_path / "base", tmp_path / "long", tmp_path / "log"
    common = ["--bank", "8", "--batch-size", "2", "--workers", "1", "--device", "cpu", "--log-dir", str(log),
              "--sample-every", "100"]
    sft.main(["vae", "--steps", "2", "--out", str(vae)] + common)
    record = json.loads((vae / "sft_record.json").read_text())
    assert record["scaling_factor"] > 0 and 0 <= record["stained_background_fraction"] <= 1
    sft.main(["mvdream", "--steps", "3", "--vae", str(vae), "--snapshot", f"2:{base}", "--out", str(long)] + common)
    from diffusers import AutoencoderKL
    trained_vae = AutoencoderKL.from_pretrained(vae)
    init = MVDreamPolicy.tiny(world.VOCAB, elevation=world.TOY.elevation, seed=0, vae=trained_vae).state_dict()
    loaded = {}
    for folder, step in ((base, 2), (long, 3)):
        record = json.loads((folder / "sft_record.json").read_text())
        assert record["step"] == step and record["args"]["steps"] == 3 and record["args"]["seed"] == 0
        policy = MVDreamPolicy.from_pretrained(str(folder))
        assert policy.latent_shape == (4, 16, 16) and policy.elevation == 15.0
        assert policy.vae.config.scaling_factor == trained_vae.config.scaling_factor
        assert policy.vae.config.latents_mean == trained_vae.config.latents_mean
        sd = policy.state_dict()
        assert set(sd) == set(init)
        vae_keys = [k for k in sd if k.startswith("vae.")]
        assert vae_keys and all(torch.equal(sd[k], init[k].half().float()) for k in vae_keys)  # frozen (fp16 file)
        assert not all(torch.equal(sd[k], init[k]) for k in sd)             # it trained (EMA moved)
        loaded[step] = sd
        traj = sample_trajectories(policy, ["a red cube"], num_steps=2, guidance_scale=5.0, generator=gen(0))
        assert traj["views"].shape == (1, 4, 3, 64, 64) and torch.isfinite(traj["views"]).all()
    assert not all(torch.equal(loaded[2][k], loaded[3][k]) for k in loaded[2])  # snapshot != final
    assert sorted(p.name for p in log.glob("*.png")) == ["mvdream_step000002.png", "mvdream_step000003.png"]


def test_latent_normalization_puts_the_white_background_at_zero_with_unit_mean_square(tmp_path):
    # what `python -m toy.sft latents` writes into the shipped VAE, checked on the shipped VAE's own bank
    vae_dir = tmp_path / "vae"
    shutil.copytree(ROOT / "checkpoints/toy/vae-tiny", vae_dir)
    sft.main(["latents", "--vae", str(vae_dir), "--bank", "16", "--workers", "1", "--device", "cpu"])
    shipped = json.loads((ROOT / "checkpoints/toy/vae-tiny/config.json").read_text())
    again = json.loads((vae_dir / "config.json").read_text())
    record = json.loads((vae_dir / "sft_record.json").read_text())
    assert record["latents_mean"] == again["latents_mean"] and record["scaling_factor"] == again["scaling_factor"]
    policy = MVDreamPolicy.tiny(world.VOCAB, elevation=world.TOY.elevation, vae=read_vae(str(vae_dir)))
    white = policy.encode(torch.ones(1, 4, 3, 64, 64))
    assert white.mean((0, 1, 3, 4)).abs().max() < 1e-4          # the background's latent is 0 per channel
    views = sft.make_bank(16, 0, torch.device("cpu"))["views"]
    assert abs(policy.encode(views).pow(2).mean().item() - 1.0) < 1e-3   # unit mean square over the bank
    # the shipped config is this computation on the first 256 examples (64 here: the same first images, fewer)
    assert np.allclose(again["latents_mean"], shipped["latents_mean"], atol=0.02)
    assert abs(again["scaling_factor"] / shipped["scaling_factor"] - 1) < 0.05


def test_sft_mvdream_state_resumes_exactly_where_a_stopped_call_left_off(tmp_path):
    # one call of 4 steps vs a call stopped after its first step (--max-minutes) and a second call resuming it
    common = ["mvdream", "--steps", "4", "--bank", "8", "--batch-size", "2", "--workers", "1", "--device", "cpu",
              "--warmup", "2", "--log-dir", str(tmp_path / "log"), "--sample-every", "100"]
    whole, split = tmp_path / "whole.pt", tmp_path / "split.pt"
    sft.main(common + ["--out", str(tmp_path / "a"), "--state", str(whole)])
    sft.main(common + ["--out", str(tmp_path / "b"), "--state", str(split), "--max-minutes", "1e-9"])
    first = torch.load(split, weights_only=False)
    assert first["step"] == 1 and json.loads((tmp_path / "b" / "sft_record.json").read_text())["step"] == 1
    sft.main(common + ["--out", str(tmp_path / "b"), "--state", str(split)])
    a, b = torch.load(whole, weights_only=False), torch.load(split, weights_only=False)
    assert a["step"] == b["step"] == 4 and [e["step"] for e in b["log"]] == [e["step"] for e in a["log"]]
    for key in ("model", "ema"):  # raw and EMA weights, bit for bit
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert not all(torch.equal(first[key][k], b[key][k]) for k in a[key])  # the second call trained
    moments = lambda s: [t for st in s["optimizer"]["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))
    assert torch.equal(a["generator"], b["generator"])
    with pytest.raises(ValueError, match=r"other arguments: lr \(saved 0.001, now 0.002\)"):
        sft.main(common + ["--out", str(tmp_path / "c"), "--state", str(split), "--lr", "2e-3"])
    with pytest.raises(ValueError, match="--state applies to `python -m toy.sft mvdream` only"):
        sft.main(["lgm", "--state", str(split), "--out", str(tmp_path / "x")])


def test_sft_lgm_smoke_writes_a_loadable_file(tmp_path):
    out = tmp_path / "lgm.safetensors"
    sft.main(["lgm", "--steps", "2", "--bank", "4", "--batch-size", "2", "--workers", "1", "--device", "cpu",
              "--out", str(out), "--log-dir", str(tmp_path / "log"), "--sample-every", "100"])
    lgm = reconstruct.LGM.from_pretrained(str(out), config="tiny")
    record = json.loads(out.with_suffix(".record.json").read_text())
    assert record["step"] == 2 and record["args"]["model"] == "lgm"
    views = ground_truth_views(["a red cube"], 0)[:, list(reconstruct.MVDREAM_TO_LGM)]
    with torch.no_grad():
        g = lgm.reconstruct(views, reconstruct.standard_cameras(-world.TOY.elevation, world.TOY.radius))
    assert g.shape == (1, N_GAUSSIANS, 14) and torch.isfinite(g).all()
    # --max-minutes stops early and saves: the record says which step the file is (how lgm-tiny-v3 was made)
    sft.main(["lgm", "--steps", "5", "--bank", "4", "--batch-size", "2", "--workers", "1", "--device", "cpu",
              "--max-minutes", "1e-9", "--out", str(out), "--log-dir", str(tmp_path / "log"), "--sample-every", "100"])
    assert json.loads(out.with_suffix(".record.json").read_text())["step"] == 1
    assert (tmp_path / "log" / "lgm_step000001.png").exists()


def test_sft_lgm_scale_range_and_vae_inputs_change_what_it_learns_from(tmp_path):
    # the same seed, bank and steps: each option changes the batches, so the weights come out different
    def run(name, *extra):
        out = tmp_path / f"{name}.safetensors"
        sft.main(["lgm", "--steps", "2", "--bank", "4", "--batch-size", "2", "--workers", "1", "--device", "cpu",
                  "--out", str(out), "--log-dir", str(tmp_path / "log"), "--sample-every", "100", *extra])
        return load_file(out), json.loads(out.with_suffix(".record.json").read_text())["args"]
    plain, _ = run("plain")
    scaled, args = run("scaled", "--scale-range", "0.7", "1.3")
    vae_in, vae_args = run("vae", "--vae-inputs", str(CKPT / "vae-tiny"))
    assert args["scale_range"] == [0.7, 1.3] and vae_args["vae_inputs"] == str(CKPT / "vae-tiny")
    again, _ = run("again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)           # deterministic: a difference is the option's
    for other in (scaled, vae_in):
        assert any(not torch.equal(plain[k], other[k]) for k in plain)


def test_sft_lgm_init_continues_from_a_trained_lgm(tmp_path, shipped_lgm):
    out = tmp_path / "lgm.safetensors"
    args = ["lgm", "--steps", "1", "--bank", "4", "--batch-size", "2", "--workers", "1", "--device", "cpu",
            "--lr", "1e-6", "--out", str(out), "--log-dir", str(tmp_path / "log"), "--sample-every", "100"]
    sft.main(args + ["--init", str(LGM_FILE)])
    start, trained = shipped_lgm.state_dict(), reconstruct.LGM.from_pretrained(str(out), config="tiny").state_dict()
    assert set(start) == set(trained)
    # one warm-up step at a tiny learning rate: close to the shipped weights, not equal to them
    assert all(torch.allclose(start[k], trained[k], atol=1e-4) for k in start)
    assert not all(torch.equal(start[k], trained[k]) for k in start)
    assert json.loads(out.with_suffix(".record.json").read_text())["args"]["init"] == str(LGM_FILE)
    with pytest.raises(ValueError, match="--init, --scale-range and --vae-inputs apply to `python -m toy.sft lgm` only"):
        sft.main(["mvdream", "--init", str(LGM_FILE), "--out", str(tmp_path / "x")])


def test_evaluate_table_rows_equal_single_evaluations(tmp_path, base_eval):
    rl_lora = CKPT / "rl-cpu"
    out = tmp_path / "table"
    rows = evaluate.main(eval_args(out, "--table", "gt=ground-truth", f"base={SFT_BASE}",
                                   f"rl={SFT_BASE}+{rl_lora}"))
    single = json.loads((base_eval / "metrics.json").read_text())
    for key in ("mrc_mean", "fidelity_mean", "size_spread", "diversity"):  # same prompts, same noise
        assert rows["base"][key] == pytest.approx(single[key], abs=1e-6)
    assert rows["gt"]["source"] == {"ground_truth": True, "through_vae": None}
    assert rows["rl"]["source"] == {"checkpoint": str(SFT_BASE), "lora": str(rl_lora)}
    assert rows["rl"]["mrc_mean"] != rows["base"]["mrc_mean"]
    lines = (out / "table.md").read_text().splitlines()
    assert len(lines) == 5 and lines[2].startswith("| gt | ") and (out / "rl" / "metrics.json").exists()
    with pytest.raises(ValueError, match="write NAME=SOURCE"):
        evaluate.main(eval_args(tmp_path / "bad", "--table", str(SFT_BASE)))


def test_evaluate_table_groups_runs_into_mean_and_std(tmp_path):
    # rows GROUP/RUN (seeds of one setting) get a summary line; ground truth with and without the VAE stand in for
    # two runs that differ
    out = tmp_path / "table"
    rows = evaluate.main(eval_args(out, "--table", "g/raw=ground-truth", f"g/vae=ground-truth+{CKPT / 'vae-tiny'}",
                                   "alone=ground-truth"))
    a, b = rows["g/raw"], rows["g/vae"]
    line = (out / "table.md").read_text().splitlines()[-1]
    assert line.startswith("| **g** (2 runs: mean ± std over runs) | ") and len(rows) == 3
    for key in ("mrc_mean", "fidelity_mean", "size_spread", "diversity"):
        mean, std = (a[key] + b[key]) / 2, abs(a[key] - b[key]) / 2 ** 0.5  # sample std of two numbers
        assert f"{mean:.3f} ± {std:.3f}" in line
    assert a["mrc_mean"] != b["mrc_mean"] and (out / "g" / "vae" / "metrics.json").exists()


def test_sft_state_refuses_a_bank_that_came_out_different(tmp_path, monkeypatch):
    common = ["mvdream", "--steps", "2", "--bank", "8", "--batch-size", "2", "--workers", "1", "--device", "cpu",
              "--warmup", "1", "--log-dir", str(tmp_path / "log"), "--sample-every", "100", "--out", str(tmp_path / "m"),
              "--state", str(tmp_path / "s.pt"), "--max-minutes", "1e-9"]
    sft.main(common)
    make_bank = sft.make_bank

    def shifted(*a, **kw):  # as if toy/world.py had changed: every rendered pixel a little darker
        bank = make_bank(*a, **kw)
        return dict(bank, views=(bank["views"] * 0.98).clamp(0, 1))

    monkeypatch.setattr(sft, "make_bank", shifted)
    with pytest.raises(ValueError, match="the remade example bank differs"):
        sft.main(common)


def test_evaluate_table_rows_in_parallel_processes_equal_one_process(tmp_path):
    # --jobs 2: rows evaluated by two worker processes (the sampled row first) come back in the order asked, with the
    # same numbers
    rows = ["a=ground-truth", f"b=ground-truth+{CKPT / 'vae-tiny'}", f"s={SFT_BASE}", "c=ground-truth"]
    one = evaluate.main(eval_args(tmp_path / "one", "--table", *rows))
    two = evaluate.main(eval_args(tmp_path / "two", "--table", *rows, "--jobs", "2"))
    assert list(two) == ["a", "b", "s", "c"] and len({two[k]["mrc_mean"] for k in "abs"}) == 3
    for name in one:
        for key in ("mrc_mean", "fidelity_mean", "size_spread", "diversity"):
            assert two[name][key] == pytest.approx(one[name][key], abs=1e-5)
    assert (tmp_path / "one" / "table.md").read_text() == (tmp_path / "two" / "table.md").read_text()
    with pytest.raises(ValueError, match="--jobs 2: parallel rows are for the CPU"):
        evaluate.main(eval_args(tmp_path / "gpu", "--table", *rows, "--jobs", "2") + ["--device", "cuda"])
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        evaluate.main(eval_args(tmp_path / "none", "--table", *rows, "--jobs", "0"))


def fake_eval_dir(root):
    # an evaluate.py --table output with rows SETTING@EPOCH/SEED (and two rows that are not, which are not read)
    rows = {"kl@0/1": 0.11, "kl@8/1": 0.10, "kl@8/2": 0.08, "nokl@9/1": 0.07, "sft-base": 0.5, "kl-best/1": 0.5}
    for name, mrc in rows.items():
        (root / name).mkdir(parents=True)
        (root / name / "metrics.json").write_text(json.dumps({"mrc_mean": mrc, "fidelity_mean": 1 - mrc,
                                                              "diversity": 2 * mrc, "size_spread": 3 * mrc}))
    return root


def test_checkpoint_curve_averages_seeds_per_setting_and_epoch(tmp_path):
    from support.run_log import checkpoint_curve_figure, plot_checkpoint_curve, read_checkpoint_curve
    fake_eval_dir(tmp_path)
    curve = read_checkpoint_curve(str(tmp_path), "mrc_mean")   # rows not named SETTING@EPOCH/SEED are not read
    assert curve == {"kl": {0: 0.11, 8: pytest.approx(0.09)}, "nokl": {9: 0.07}}
    out = plot_checkpoint_curve(str(tmp_path), str(tmp_path / "curve.png"), keys=("mrc_mean", "diversity"))
    assert Image.open(out).size[0] > Image.open(out).size[1] and Path(out).stat().st_size > 5000
    fig = checkpoint_curve_figure(str(tmp_path), keys=("mrc_mean", "diversity"))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["test mrc_mean", "test diversity"]
    for ax, scale in zip(axes, (1, 2)):                       # one line per setting, at its own epochs
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"kl", "nokl"} and ax.get_xlabel() == "epoch"
        assert list(lines["kl"].get_xdata()) == [0, 8] and list(lines["nokl"].get_xdata()) == [9]
        assert list(lines["kl"].get_ydata()) == pytest.approx([scale * 0.11, scale * 0.09])
        assert [lines[n].get_color() for n in ("kl", "nokl")] == [axes[0].get_lines()[i].get_color() for i in (0, 1)]
    (legend,) = fig.legends                                   # one legend for the figure
    assert [t.get_text() for t in legend.get_texts()] == ["kl", "nokl"]
    with pytest.raises(FileNotFoundError, match="no rows named SETTING@EPOCH/SEED"):
        read_checkpoint_curve(str(tmp_path / "kl-best"), "mrc_mean")


@pytest.mark.parametrize("keys", [("mrc_mean", "fidelity_mean", "diversity"),
                                  ("mrc_mean", "fidelity_mean", "diversity", "size_spread")])
def test_panel_titles_and_legend_fit_inside_the_figure(tmp_path, keys):
    # "test fidelity_mean" is the longest title run_log draws; 4 panels go on 2 rows
    from support.run_log import checkpoint_curve_figure
    fig = checkpoint_curve_figure(str(fake_eval_dir(tmp_path)), keys=keys)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = lambda box: (box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width  # noqa: E731
                          and box.y1 <= fig.bbox.height)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(keys) and all(inside(ax.title.get_window_extent(renderer)) for ax in axes)
    assert all(inside(ax.get_tightbbox(renderer)) for ax in axes)       # tick labels and axis labels too
    assert inside(fig.legends[0].get_window_extent(renderer))
    rows = {round(ax.get_position().y0, 3) for ax in axes}
    assert len(rows) == (1 if len(keys) <= 3 else 2)


def test_run_log_command_line_plots_an_eval_dir(tmp_path):
    # python -m support.run_log --eval DIR: test metrics along training, from an evaluate.py table whose rows are
    # named SETTING@EPOCH/SEED
    import subprocess
    import sys
    out = tmp_path / "collapse.png"
    done = subprocess.run([sys.executable, "-m", "support.run_log", "--eval", str(fake_eval_dir(tmp_path / "eval")),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and Image.open(out).format == "PNG"


# ------------------------------------------------------------------------------ 7. captioned grids of views

def test_caption_lines_wrap_the_prompt_at_words_and_keep_the_score_whole():
    font = ImageFont.load_default(size=images.CAPTION_FONT_SIZE)
    prompt = "a yellow cylinder with a purple cone on its front"
    for caption, score in ((f"{prompt} | MRC 0.123", "| MRC 0.123"), (f"{prompt} | r -0.094", "| r -0.094")):
        for width in (100, 160, 252, 1000):
            lines = images.caption_lines(caption, width, font)
            assert lines[-1].endswith(score)                                   # the score, complete, last
            assert " ".join(lines) == f"{prompt} {score}"                      # words whole, none lost, in order
            assert all(font.getlength(line) <= width for line in lines)        # every line fits
            words = [line.replace(score, "").split() for line in lines]
            assert all(w == prompt.split()[i:i + len(w)] for w, i in           # each line: consecutive whole words
                       zip(words, np.cumsum([0] + [len(w) for w in words[:-1]])))
        assert len(images.caption_lines(caption, 100, font)) > len(images.caption_lines(caption, 252, font))
    assert images.caption_lines(f"{prompt} | MRC 0.1", 2000, font) == [f"{prompt} | MRC 0.1"]   # one line if it fits
    assert images.caption_lines("a red cube", 1000, font) == ["a red cube"]                     # no score: prompt only
    narrow = images.caption_lines("a red cube", font.getlength("cube"), font)
    assert len(narrow) >= 2 and " ".join(narrow) == "a red cube"


def test_save_grid_grows_its_caption_strip_with_the_caption_lines_and_keeps_the_views(tmp_path):
    prompts = ["a red cube", "a yellow cylinder with a purple cone on its front"]
    views = ground_truth_views(prompts, 0)                                    # (2, 4, 3, 64, 64)
    line = images.caption_line_px()
    heights = {}
    for name, captions in (("short", ["a red cube | r 0.1", "a blue ball | r 0.2"]),
                           ("long", [f"{p} | MRC 0.123" for p in prompts])):
        path = images.save_grid(str(tmp_path / f"{name}.png"), views, captions)
        n_lines = max(len(images.caption_lines(c, 4 * RES - 2 * images.CAPTION_PAD)) for c in captions)
        grid = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        assert grid.shape[1:] == (2 * (RES + n_lines * line + 2 * images.CAPTION_PAD), 4 * RES)
        heights[name] = (n_lines, grid.shape[1])
        for row in range(2):                                                 # the views, pixel for pixel (8-bit)
            expect = (views[row] * 255).round().to(torch.uint8)
            assert torch.equal(grid_views(grid, row, 2), expect)
    assert heights["short"][0] == 1 and heights["long"][0] >= 2 and heights["long"][1] > heights["short"][1]
