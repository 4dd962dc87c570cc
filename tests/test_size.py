# Object size in the toy world (the toy's MRC changes with the size a consistent object is drawn at): scale_object,
# fidelity.size_bias, the size-adjusted MRC and its reference curve, the tables' paired bootstrap, the robustness
# experiment's scale rows (Carve3D Sec. 3's controlled inconsistency) and the best/ rule's size condition. Real
# classes at the toy size on the CPU: the shipped lgm-tiny-v3 and vae-tiny.
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import reward
import train
from reward import MRCReward, load_lpips
from reconstruct import LGM
from support import checkpoint
from support.seeding import make_generator
from support.stats import bootstrap_indices, interp_linear, percentile_ci
from toy import fidelity, world

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "toy"
LGM_FILE, VAE_DIR = CKPT / "lgm-tiny-v3.safetensors", CKPT / "vae-tiny"
PROMPTS = ["a red cube with a blue ball on its left", "a green cone"]


def objects(prompts, seed=0):
    return torch.stack([world.make_object(p, make_generator("cpu", seed, "object", i, 0))
                        for i, p in enumerate(prompts)])


# ------------------------------------------------------------------------------------------ scale_object

def test_scale_object_takes_one_factor_per_object():
    g = objects(PROMPTS)
    both = world.scale_object(g, torch.tensor([0.5, 2.0]))
    assert torch.equal(both[0], world.scale_object(g[:1], 0.5)[0]) and torch.equal(both[1], world.scale_object(g[1:], 2.0)[0])


# -------------------------------------------------------------------- reward.zoom_to_size (mrc_object_size)

def reach(views, threshold=0.8):
    # (..., 3, S, S) -> farthest foreground pixel from the image centre along x or y, as zoom_to_size measures it
    S = views.shape[-1]
    fg = (views < threshold).any(-3)
    d = (torch.arange(S) - (S - 1) / 2).abs()
    r = lambda m: torch.where(m, d, torch.zeros_like(d)).amax(-1) + 0.5  # noqa: E731
    return torch.maximum(r(fg.any(-2)), r(fg.any(-1)))


def test_zoom_to_size_zooms_every_view_of_a_sample_by_one_factor_to_the_asked_reach():
    views = world.render_views(objects(PROMPTS))                         # (2, 4, 3, 64, 64)
    small = views.clone()
    small[:, 1] = world.render_views(world.scale_object(objects(PROMPTS), 0.7))[:, 1]  # view 1 drawn smaller
    for v in (views, small):
        out = reward.zoom_to_size(v, 0.6, threshold=0.8)
        before, after = reach(v), reach(out)
        # the mean reach over the 4 views lands at 0.6 of the half-image (to a pixel of resampling) ...
        assert (after.mean(1) - 0.6 * 32).abs().max() < 1.5
        # ... by one factor per sample: every view's reach grows (or shrinks) alike
        ratio = after / before
        assert (ratio - ratio.mean(1, keepdim=True)).abs().max() < 0.1
    # so the smaller view 1 stays smaller than the others after the zoom: the inconsistency is kept
    out = reward.zoom_to_size(small, 0.6, threshold=0.8)
    assert (reach(out)[:, 1] < reach(out)[:, [0, 2, 3]].min(1).values).all()


def test_zoom_to_size_of_an_object_scaled_in_3d_is_the_object_at_the_common_size():
    # the toy's objects sit at the cameras' look-at point: a 2D zoom about the centre is a 3D scale about it
    g = objects(PROMPTS)
    a = reward.zoom_to_size(world.render_views(world.scale_object(g, 0.8)), 0.6, threshold=0.8)
    b = reward.zoom_to_size(world.render_views(world.scale_object(g, 1.2)), 0.6, threshold=0.8)
    raw = (world.render_views(world.scale_object(g, 0.8)) - world.render_views(world.scale_object(g, 1.2))).abs()
    assert (a - b).abs().mean() < 0.25 * raw.mean()


def test_mrc_object_size_off_is_carve3d_mrc(shipped_reward_parts):
    lgm, alex = shipped_reward_parts
    views = world.render_views(objects(PROMPTS))
    plain = MRCReward(lgm, alex, elevation=15.0)(views)["mrc"]
    assert torch.equal(MRCReward(lgm, alex, elevation=15.0, object_size=0.0)(views)["mrc"], plain)
    assert not torch.equal(MRCReward(lgm, alex, elevation=15.0, object_size=0.6, fg_threshold=0.8)(views)["mrc"], plain)


@pytest.fixture(scope="module")
def shipped_reward_parts():
    return LGM.from_pretrained(str(LGM_FILE), config="tiny").eval().requires_grad_(False), load_lpips("alex")


def test_scale_object_scales_positions_and_gaussian_scales_and_keeps_the_rest():
    g = objects(PROMPTS)
    before = g.clone()
    big = world.scale_object(g, 1.3)
    assert torch.equal(g, before)                                         # a copy: the input is left alone
    assert torch.allclose(big[..., 0:3], 1.3 * g[..., 0:3]) and torch.allclose(big[..., 4:7], 1.3 * g[..., 4:7])
    for ch in (3, *range(7, 14)):                                         # opacity, rotation, colour
        assert torch.equal(big[..., ch], g[..., ch])
    assert torch.equal(world.scale_object(g, 1.0), g)
    # about the origin, which make_object puts at the centre of the object's bounding box
    visible = g[0, :, 3] > 0
    lo, hi = g[0, visible, 0:3].amin(0), g[0, visible, 0:3].amax(0)
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-6)
    # ground_truth_views(scale=f) renders exactly these objects
    views = world.ground_truth_views(PROMPTS[:1], 1, 0, scale=0.8)
    assert torch.equal(views[0, 0], world.render_views(world.scale_object(objects(PROMPTS[:1]), 0.8))[0])


# ------------------------------------------------------------------------------------------ size bias

def test_size_bias_of_ground_truth_scaled_in_3d_is_two_log_f():
    g = objects(PROMPTS)
    base = world.render_views(g)
    b1 = fidelity.size_bias(base, PROMPTS)
    for f in (0.8, 1.25):
        bf = fidelity.size_bias(world.render_views(world.scale_object(g, f)), PROMPTS)
        # area goes with f^2; the tolerance covers the rasterised silhouettes' few pixels at another size
        assert (bf - b1 - 2 * math.log(f)).abs().max() < 0.1, (f, (bf - b1).tolist())
    # the hand computation: mean over views of log(area / ground truth's mean area), an absent object as 4 px
    expected = torch.stack([fidelity._expected(world.parse_prompt(p), world.TOY.elevation, 64)["main_area"]
                            for p in PROMPTS])
    blank = fidelity.size_bias(torch.ones_like(base), PROMPTS)
    assert torch.allclose(blank, (4.0 / expected).log().mean(1), atol=1e-6)
    # one measurement for all three, the same as each alone
    fid, spread, bias = fidelity.fidelity_and_size(base, PROMPTS)
    assert torch.equal(bias, b1) and torch.equal(spread, fidelity.size_spread(base, PROMPTS))
    assert torch.equal(fid, fidelity.fidelity(base, PROMPTS))
    assert all(x.shape == (0,) for x in fidelity.fidelity_and_size(torch.zeros(0, 4, 3, 64, 64), []))


# ------------------------------------------------------------------------------------------ size-adjusted MRC

def test_size_adjusted_mrc_is_the_hand_interpolated_difference():
    # reference at linear scales 0.8, 1.0, 1.2 (size bias 2 log s), MRC 0.06, 0.08, 0.12 (two prompts, averaged)
    ref_bias = torch.tensor([[2 * math.log(0.8), 0.0, 2 * math.log(1.2)]] * 2, dtype=torch.float64)
    ref_mrc = torch.tensor([[0.05, 0.07, 0.10], [0.07, 0.09, 0.14]], dtype=torch.float64)
    for s, expect in ((1.1, 0.08 + 0.04 * 0.5),        # inside: halfway along the segment 1.0 -> 1.2
                      (1.3, 0.12 + 0.2 * 0.1),          # beyond: the last segment's slope (0.04 / 0.2)
                      (0.7, 0.06 - 0.1 * 0.1)):         # below: the first segment's slope (0.02 / 0.2)
        bias = torch.tensor([2 * math.log(s) + 0.1, 2 * math.log(s) - 0.1], dtype=torch.float64)
        adjusted, scale, at = evaluate.size_adjusted_mrc(torch.tensor([0.10, 0.12], dtype=torch.float64), bias,
                                                         ref_mrc, ref_bias)
        assert scale.item() == pytest.approx(s) and at.item() == pytest.approx(expect)
        assert adjusted.item() == pytest.approx(0.11 - expect)
    # batched over bootstrap resamples, points in any order
    xs = torch.tensor([[1.2, 0.8, 1.0], [0.0, 1.0, 2.0]])
    ys = torch.tensor([[0.12, 0.06, 0.08], [1.0, 3.0, 2.0]])
    assert torch.allclose(interp_linear(torch.tensor([1.1, 0.5]), xs, ys), torch.tensor([0.10, 2.0]))


def test_bootstrap_indices_are_fixed_and_a_constant_has_a_zero_width_interval():
    a, b = bootstrap_indices(5, 100, 0), bootstrap_indices(5, 100, 0)
    assert torch.equal(a, b) and a.shape == (100, 5) and a.min() >= 0 and a.max() <= 4
    assert not torch.equal(a, bootstrap_indices(5, 100, 1))
    assert percentile_ci(torch.full((50,), 0.25)) == [0.25, 0.25]
    x = torch.arange(1001, dtype=torch.float64)                    # quantiles 0.025 and 0.975 of 0..1000
    assert percentile_ci(x) == pytest.approx([25.0, 975.0])
    assert percentile_ci(torch.tensor([1.0, float("nan"), 3.0]), level=1.0) == [1.0, 3.0]


def eval_args(out, *what):
    return [*what, "--num-prompts", "2", "--seeds", "2", "--num-steps", "3", "--device", "cpu", "--lgm", str(LGM_FILE),
            "--seed", "0", "--out", str(out)]


def test_table_size_adjusts_against_ground_truth_through_the_vae_and_pairs_the_bootstrap(tmp_path):
    out = tmp_path / "table"
    vae_row = f"ground-truth+{VAE_DIR}"
    rows = evaluate.main(eval_args(out, "--table", "gt=ground-truth", f"gt-vae={vae_row}", f"again={vae_row}",
                                   "--gap", "gt,gt-vae", "--compare", "again", "--bootstrap", "200"))
    ref = json.loads((out / "size_reference.json").read_text())
    summary = json.loads((out / "table.json").read_text())["rows"]
    at = ref["scales"].index(1.0)
    # ground truth through the VAE is the reference's scale-1 point: same objects, noise, VAE and reward
    assert [m[at] for m in ref["mrc"]] == pytest.approx(evaluate.per_prompt(rows["gt-vae"]["per_sample"]["mrc"], 2)
                                                        .tolist(), abs=1e-7)
    assert [b[at] for b in ref["size_bias"]] == pytest.approx(evaluate.per_prompt(
        rows["gt-vae"]["per_sample"]["size_bias"], 2).tolist(), abs=1e-7)
    assert abs(rows["gt-vae"]["mrc_size_adjusted"]) < 1e-6 and abs(summary["gt-vae"]["mrc_size_adjusted"]) < 1e-6
    # the raw renders by hand: MRC minus the reference at the row's linear scale, on the segment around it
    gt = rows["gt"]
    s = math.exp(gt["size_bias"] / 2)
    xs = np.exp(np.mean(ref["size_bias"], 0) / 2)
    ys = np.mean(ref["mrc"], 0)
    k = int(np.clip(np.searchsorted(xs, s), 1, len(xs) - 1))
    hand = gt["mrc_mean"] - (ys[k - 1] + (ys[k] - ys[k - 1]) * (s - xs[k - 1]) / (xs[k] - xs[k - 1]))
    assert gt["mrc_size_adjusted"] == pytest.approx(hand, abs=1e-6) and gt["size_scale"] == pytest.approx(s)
    assert summary["gt"]["mrc_size_adjusted"] == pytest.approx(hand, abs=1e-6)
    # a row against itself: the paired difference is exactly 0 in every resample
    for name in ("gt-vae", "again"):
        assert summary[name]["mrc_size_adjusted_minus_compare"] == 0.0
        assert summary[name]["mrc_size_adjusted_minus_compare_ci"] == [0.0, 0.0]
    lo, hi = summary["gt"]["mrc_size_adjusted_minus_compare_ci"]
    assert lo <= summary["gt"]["mrc_size_adjusted_minus_compare"] <= hi and hi > lo
    # the gap: 0 at its base, 1 at its reference, in every resample
    assert summary["gt"]["gap_closed_ci"] == [0.0, 0.0] and summary["gt-vae"]["gap_closed_ci"] == [1.0, 1.0]
    assert summary["gt"]["mrc"] == pytest.approx(gt["mrc_mean"], abs=1e-7)
    # size bias, size spread and diversity get paired intervals too: by hand from the same resampled prompts
    idx = bootstrap_indices(2, 200, evaluate.BOOTSTRAP_SEED)
    for key, per in (("size_bias", evaluate.per_prompt(gt["per_sample"]["size_bias"], 2)),
                     ("size_spread", evaluate.per_prompt(gt["per_sample"]["size_spread"], 2)),
                     ("diversity", torch.tensor(gt["per_prompt"]["diversity"], dtype=torch.float64))):
        assert summary["gt"][key] == pytest.approx(gt[key], abs=1e-7)
        assert summary["gt"][key + "_ci"] == pytest.approx(percentile_ci(per[idx].mean(1)), abs=1e-9)
    assert summary["gt"]["diversity_ratio_ci"] == [1.0, 1.0]     # the gap's base against itself
    ratio = torch.tensor(rows["gt-vae"]["per_prompt"]["diversity"], dtype=torch.float64)[idx].mean(1) / \
        torch.tensor(gt["per_prompt"]["diversity"], dtype=torch.float64)[idx].mean(1)
    assert summary["gt-vae"]["diversity_ratio_ci"] == pytest.approx(percentile_ci(ratio), abs=1e-9)
    lines = (out / "table.md").read_text().splitlines()
    assert len(lines) == 5 and "size-adj MRC − again [CI]" in lines[0] and lines[3].startswith("| gt-vae | ")
    assert "diversity / gt [CI]" in lines[0]
    # the reference is cached under what it depends on: reread without a reward, recomputed when a key changes
    args = evaluate.argparse.Namespace(out=str(out), **{k: v for k, v in ref["key"].items() if k != "prompts"})
    assert evaluate.size_reference(args, ref["key"]["prompts"], None, torch.device("cpu")) == ref
    args.seeds = 1
    with pytest.raises(TypeError):                              # not cached: it would need the reward
        evaluate.size_reference(args, ref["key"]["prompts"], None, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ robustness

def test_robustness_scale_rows_on_raw_renders_and_through_the_vae(tmp_path):
    out = tmp_path / "robustness"
    result = evaluate.main(["--robustness", "--levels", "1", "--scales", "0.8", "1.0", "1.2", "--num-prompts", "2",
                            "--seed", "0", "--device", "cpu", "--lgm", str(LGM_FILE), "--out", str(out)])
    assert result == json.loads((out / "robustness.json").read_text())
    assert result["through_vae"] == evaluate.REFERENCE_VAE and result["scales"] == [0.8, 1.0, 1.2]
    for setting in ("raw", "vae"):
        r = result[setting]
        assert set(r["mrc"]) == {*world.DISTORTIONS, evaluate.CONSISTENT, evaluate.ONE_VIEW}
        one, flat = r["mrc"][evaluate.ONE_VIEW], r["mrc"][evaluate.CONSISTENT]
        # scale 1 and level 0 are the same undistorted views
        assert one[1] == flat[1] == r["mrc"]["shift"][0]
        assert one[0] > one[1] and one[2] > one[1] and r["one_view_rises"] is True
        assert r["consistent_scale_max_deviation"] == pytest.approx(max(abs(v / flat[1] - 1) for v in flat))
    # the consistent row by hand: the reward of ground truth scaled by 0.8 in 3D, raw and through the VAE
    prompts = evaluate.load_prompts("toy:test", 2)
    views = world.render_views(world.scale_object(objects(prompts), 0.8))
    reward_fn = MRCReward(LGM.from_pretrained(str(LGM_FILE), config="tiny").requires_grad_(False), load_lpips("alex"),
                          elevation=15.0, fg_threshold=0.8, object_size=0.6)  # evaluate.py's defaults (toy.yaml)
    with torch.no_grad():
        raw = reward_fn(views)["mrc"].mean().item()
        vae = reward_fn(evaluate.vae_roundtrip(views, str(VAE_DIR), torch.device("cpu")))["mrc"].mean().item()
    assert result["raw"]["mrc"][evaluate.CONSISTENT][0] == pytest.approx(raw, abs=1e-6)
    assert result["vae"]["mrc"][evaluate.CONSISTENT][0] == pytest.approx(vae, abs=1e-6)
    md = (out / "robustness.md").read_text()
    assert md.count("| consistent scale |") == 2 and "through the VAE" in md and "rises with abs(log scale): yes" in md
    assert Image.open(out / "robustness.png").size == (900, 660)  # a row of two panels per setting
    with pytest.raises(ValueError, match="--scales must include 1.0"):
        evaluate.main(["--robustness", "--scales", "0.9", "1.1", "--out", str(tmp_path / "x"), "--device", "cpu"])


# ------------------------------------------------------------------------------------------ best/

def test_best_checkpoint_refuses_a_size_drift_away_from_zero_and_accepts_a_move_toward_it(tmp_path):
    cfg = train.load_config(os.path.join(ROOT, "toy.yaml"), [f"run_dir={tmp_path}", "best_max_size_drift=0.05"])
    rule = checkpoint.BestCheckpoint(cfg, {})
    start = {"val_mrc": 0.5, "val_fidelity": 0.8}
    assert rule.qualifies(0, {**start, "val_size_bias": 0.20})
    assert rule.qualifies(4, {**start, "val_size_bias": 0.24})       # within 0.05 of epoch 0's
    assert not rule.qualifies(5, {**start, "val_size_bias": 0.26})   # 0.06 farther from 0
    assert rule.qualifies(6, {**start, "val_size_bias": 0.02})       # toward 0, by any amount
    assert rule.qualifies(7, {**start, "val_size_bias": -0.19})      # across 0, no farther from it
    assert not rule.qualifies(8, {**start, "val_size_bias": -0.26})
    assert rule.qualifies(9, start)                                  # a validation without it (older runs)
    old = checkpoint.BestCheckpoint(cfg, {})                         # an older run: no size bias at epoch 0
    assert old.qualifies(0, start) and old.qualifies(4, {**start, "val_size_bias": 0.5})
    assert "best_max_size_drift" in checkpoint.BestCheckpoint.__doc__
    with pytest.raises(ValueError, match="best_max_size_drift"):
        train.load_config(os.path.join(ROOT, "toy.yaml"), [f"run_dir={tmp_path}", "best_max_size_drift=-1"])
