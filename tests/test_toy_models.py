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
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import reconstruct
import reward
from mvdream import MVDreamPolicy
from sample import sample_trajectories
from support import images
from support.seeding import make_generator
from toy import fidelity
from toy import sft
from toy import world

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "toy"
# the reward: the first tiny LGM (lgm-tiny, in git history at 533d5a0) trained 1,341 steps more (its record)
SFT_BASE, SFT_LONG, LGM_FILE = CKPT / "sft-base", CKPT / "sft-long", CKPT / "lgm-tiny-v2.safetensors"
VAE_DIR = CKPT / "vae-tiny"
RES = world.TOY.resolution                  # 64
N_GAUSSIANS = 4 * 32 * 32                 # tiny LGM: 4 input views x splat_size^2 pixels -> one Gaussian each
CAPTION_PX = 12                           # support.images.save_grid: a caption strip above each row of views


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
    steps = [json.loads((f / "sft_record.json").read_text())["step"] for f in (SFT_BASE, SFT_LONG)]
    # "longer SFT" is 4.3x the steps (Carve3D compares 10K with 20K / 100K; 5x was planned, the GPU call ran out)
    assert 4 * steps[0] <= steps[1]
    # both are latent models on the shipped VAE, which MVDream SFT keeps frozen (stored in fp16)
    vae = load_file(VAE_DIR / "diffusion_pytorch_model.safetensors")
    for sd in (sd_b, sd_l):
        assert all(torch.equal(sd["vae." + k], v.half().float()) for k, v in vae.items())

    for policy in (base, long):
        traj = sample_trajectories(policy, ["a red cube"], num_steps=2, guidance_scale=5.0, generator=gen(0))
        views = traj["views"]
        assert views.shape == (1, 4, 3, 64, 64)
        assert torch.isfinite(views).all() and views.min() >= 0 and views.max() <= 1
        assert traj["latents"].shape == (1, 2, 4, 4, 16, 16)


# rl-gpu: GPU run kl-1's best/ (epoch 12, chosen with the diversity condition); rl-cpu: the CPU main job's best/, its
# last epoch (19). fidelity_0: each run's epoch-0 val fidelity (its metrics.jsonl).
@pytest.mark.parametrize("name, best_epoch, fidelity_0", [("rl-cpu", 19, 0.7646), ("rl-gpu", 12, 0.7783)])
def test_shipped_rl_lora_loads_onto_sft_base_and_changes_its_samples(name, best_epoch, fidelity_0):
    folder = CKPT / name
    policy = MVDreamPolicy.from_pretrained(str(SFT_BASE))
    policy.load_lora(folder / MVDreamPolicy.LORA_FILE)               # strict: every key placed, none missing
    on_disk = load_file(folder / MVDreamPolicy.LORA_FILE)
    assert len(on_disk) == len(policy.lora_state_dict()) and any(v.abs().max() > 0 for v in on_disk.values())
    best = json.loads((folder / "best.json").read_text())
    assert best["epoch"] == best_epoch and best["metrics"]["val_fidelity"] >= fidelity_0 - 0.05
    config = yaml.safe_load((folder / "train_config.yaml").read_text())
    assert config["policy"] == str(SFT_BASE.relative_to(ROOT)) and config["lgm"] == str(LGM_FILE.relative_to(ROOT))
    if config.get("best_min_diversity", 0) > 0:  # the rule's diversity condition held at the chosen validation
        start = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        assert start["epoch"] == 0 and start["best_epoch"] == 0
        assert best["metrics"]["val_diversity"] >= config["best_min_diversity"] * start["val_diversity"]
    traj = sample_trajectories(policy, ["a red cube"], num_steps=3, guidance_scale=5.0, generator=gen(0))
    with policy.disable_adapters():
        base = sample_trajectories(policy, ["a red cube"], num_steps=3, guidance_scale=5.0, generator=gen(0))
    assert not torch.equal(traj["views"], base["views"])


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

# Threshold for the MRC of ground-truth renders. Measured with lgm-tiny-v2 (CPU, these 5 prompts x 2 seeds): mean
# 0.117, max 0.168; with view 1 swapped: 0.14..0.45 (the first lgm-tiny: 0.144, 0.170, 0.21..0.43). An untrained
# tiny LGM scores 0.66..0.79 on the same views.
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


def test_lgm_v2_loads_strictly_and_records_its_parent():
    lgm = reconstruct.LGM.from_pretrained(str(LGM_FILE), config=None)
    on_disk = load_file(LGM_FILE)
    assert lgm.config.name == "tiny" and set(on_disk) == set(lgm.state_dict())
    record = json.loads(LGM_FILE.with_suffix(".record.json").read_text())
    assert record["args"]["init"] == "checkpoints/toy/lgm-tiny.safetensors" and record["step"] > 1000


def test_lgm_v2_sees_inconsistency_more_than_simplicity(shipped_lgm, alex):
    # What RL exploits: the reward should rise more for 4 views that are not one object than it falls for an
    # object without its part. With the first LGM (lgm-tiny, no longer shipped) it was the other way round (32 test
    # prompts x 2: +0.042 vs -0.052, so RL learned to drop parts); with v2 it is not (+0.052 vs -0.034).
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
    assert grid.size == (4 * RES, num_prompts * (RES + CAPTION_PX)) and grid.mode == "RGB"
    return metrics, torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)


def grid_views(grid, row):
    # (4, 3, 64, 64) uint8: the 4 views pasted in row `row` of support.images.save_grid's layout
    top = row * (RES + CAPTION_PX) + CAPTION_PX
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
    mrc = reward.MRCReward(shipped_lgm, alex, elevation=15.0)(views)["mrc"]
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
        assert (grid_views(grid, row).int() - expect.int()).abs().max() <= 1


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
    mrc = reward.MRCReward(shipped_lgm, alex, elevation=15.0)(roundtrip)["mrc"]
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
    assert Image.open(out / "robustness.png").size == (560, 380)


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
    views = ground_truth_views(["a red cube", "a blue ball with a green cone on its left"], 0)   # (2, 4, 3, 64, 64)
    same = views[:, None].expand(-1, 3, -1, -1, -1, -1)                                       # 3 identical samples
    assert evaluate.diversity(same, alex) == 0.0
    other = ground_truth_views(["a red cube", "a blue ball with a green cone on its left"], 50)
    different = torch.stack([views, other], 1)                                                # (P=2, S=2, ...)
    d = evaluate.diversity(different, alex)
    with torch.no_grad():
        expect = torch.stack([alex(views[i], other[i], normalize=True).mean() for i in range(2)]).mean().item()
    assert d > 0 and d == pytest.approx(expect, abs=1e-6)
    assert math.isnan(evaluate.diversity(views[:, None], alex))                            # 1 sample: undefined


def test_line_plot_writes_a_png_of_the_requested_size(tmp_path):
    path = tmp_path / "plot.png"
    images.line_plot(str(path), [0, 1, 2], {"a": [0.1, 0.2, 0.3], "b": [0.3, 0.2, 0.25]}, "x", "y", size=(300, 200))
    img = Image.open(path).convert("RGB")
    assert img.size == (300, 200)
    colours = {c for _, c in img.getcolors(300 * 200)}
    assert (214, 39, 40) in colours and (31, 119, 180) in colours    # both series drawn in their colours


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
    # --max-minutes stops early and saves: the record says which step the file is (how lgm-tiny-v2 was made)
    sft.main(["lgm", "--steps", "5", "--bank", "4", "--batch-size", "2", "--workers", "1", "--device", "cpu",
              "--max-minutes", "1e-9", "--out", str(out), "--log-dir", str(tmp_path / "log"), "--sample-every", "100"])
    assert json.loads(out.with_suffix(".record.json").read_text())["step"] == 1
    assert (tmp_path / "log" / "lgm_step000001.png").exists()


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
    with pytest.raises(ValueError, match="--init applies to `python -m toy.sft lgm` only"):
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


def test_checkpoint_curve_averages_seeds_per_setting_and_epoch(tmp_path):
    from support.run_log import plot_checkpoint_curve, read_checkpoint_curve
    rows = {"kl@0/1": 0.11, "kl@8/1": 0.10, "kl@8/2": 0.08, "nokl@9/1": 0.07, "sft-base": 0.5, "kl-best/1": 0.5}
    for name, mrc in rows.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"mrc_mean": mrc, "diversity": 2 * mrc}))
    curve = read_checkpoint_curve(str(tmp_path), "mrc_mean")   # rows not named SETTING@EPOCH/SEED are not read
    assert curve == {"kl": {0: 0.11, 8: pytest.approx(0.09)}, "nokl": {9: 0.07}}
    out = plot_checkpoint_curve(str(tmp_path), str(tmp_path / "curve.png"), keys=("mrc_mean", "diversity"))
    assert Image.open(out).size == (2 * 420, 300)
    with pytest.raises(FileNotFoundError, match="no rows named SETTING@EPOCH/SEED"):
        read_checkpoint_curve(str(tmp_path / "kl-best"), "mrc_mean")


def test_line_plot_series_with_their_own_x_values(tmp_path):
    # a dict series is drawn at its own x: one point at x = 2 lands at the right end of the axis, not at x = 0
    path = tmp_path / "plot.png"
    images.line_plot(str(path), [0, 1, 2], {"a": [0.1, 0.2, 0.3], "b": {2: 0.2}}, "x", "y", size=(300, 200))
    img = np.asarray(Image.open(path).convert("RGB"))
    ys, xs = np.nonzero((img == (31, 119, 180)).all(-1))
    plot_area = xs[ys > 60]                                   # below the legend (same colour, top right, y < 50)
    assert len(plot_area) and plot_area.min() >= 300 - 130 - 4   # the right edge of the axes (right margin 130)
