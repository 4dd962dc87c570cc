# view3d.py and support/ply.py: the 3D result as a .ply (Inria's 3DGS layout), orbit cameras and GIFs, the README
# strip CLI, evaluate.py --orbit, and MRCReward.reconstruct (the Gaussians the reward renders). The .ply is checked
# by parsing the file here, independently of support/ply.py.
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import evaluate
import reconstruct
import reward
import view3d
from mvdream import MVDreamPolicy
from sample import sample_trajectories
from support.ply import read_ply, write_ply
from support.seeding import make_generator
from toy import world

ROOT = Path(__file__).resolve().parents[1]
SFT_BASE, LGM_FILE = ROOT / "checkpoints" / "toy" / "sft-base", ROOT / "checkpoints" / "toy" / "lgm-tiny-v3.safetensors"
PROMPT = "a red cube with a blue cone on its left"
# Inria's vertex properties in file order (graphdeco-inria/gaussian-splatting scene/gaussian_model.py
# construct_list_of_attributes, SH degree 3), written out here rather than imported from support/ply.py
INRIA_PROPERTIES = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
                    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
C0 = 0.28209479177387814


@pytest.fixture(scope="module")
def reward_fn():
    lgm = reconstruct.LGM.from_pretrained(str(LGM_FILE), config="tiny").requires_grad_(False)
    # evaluate.py's and view3d.py's defaults (toy.yaml's reward): box threshold 0.8, views zoomed alike to size 0.6
    return reward.MRCReward(lgm, reward.load_lpips("alex"), elevation=world.TOY.elevation, fg_threshold=0.8,
                            object_size=0.6)


def gt_object(seed=0):
    return world.make_object(PROMPT, torch.Generator().manual_seed(seed))   # (1024, 14), padded with opacity 0


def tricky_gaussians():
    # a toy object (its padding has opacity exactly 0) with the edge cases of the encoding: opacity just below and
    # at the pruning threshold and exactly 1, unnormalised quaternions, colours at 0 and 1
    g = gt_object()
    g[0, 3], g[1, 3], g[2, 3] = 0.004, 0.005, 1.0
    g[:, 7:11] *= torch.linspace(0.5, 3.0, len(g))[:, None]
    g[3, 11:14], g[4, 11:14] = 0.0, 1.0
    return g


def parse_ply(path):
    # an independent reader: the header line by line, then the body as one numpy structured array
    data = Path(path).read_bytes()
    header, body = data.split(b"end_header\n", 1)
    lines = header.decode("ascii").splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    assert lines[2].startswith("element vertex ")
    count = int(lines[2].split()[2])
    props = [line.split() for line in lines[3:]]
    assert all(len(p) == 3 and p[0] == "property" and p[1] == "float" for p in props)
    names = [p[2] for p in props]
    dtype = np.dtype([(n, "<f4") for n in names])
    assert len(body) == count * dtype.itemsize                       # nothing else after the vertices
    return names, np.frombuffer(body, dtype=dtype)


# ------------------------------------------------------------------------------------------------ .ply files

def test_ply_follows_inrias_layout_field_by_field(tmp_path):
    g = tricky_gaussians()
    path = tmp_path / "object.ply"
    written = write_ply(path, g)
    names, v = parse_ply(path)
    assert names == INRIA_PROPERTIES and len(names) == 62
    assert v.dtype.itemsize == 62 * 4 and all(v.dtype[n] == np.dtype("<f4") for n in names)

    keep = g[:, 3] >= 0.005                                          # LGM's pruning; the 0-opacity padding goes
    assert not keep[0] and keep[1] and keep[2] and (g[:, 3] == 0).any()
    k = g[keep].double().numpy()
    assert written == len(v) == int(keep.sum())
    col = lambda *ns: np.stack([v[n].astype(np.float64) for n in ns], 1)  # noqa: E731
    np.testing.assert_array_equal(col("x", "y", "z"), k[:, 0:3].astype(np.float32))
    assert (col("nx", "ny", "nz") == 0).all() and (col(*[f"f_rest_{i}" for i in range(45)]) == 0).all()
    np.testing.assert_allclose(col("f_dc_0", "f_dc_1", "f_dc_2"), (k[:, 11:14] - 0.5) / C0, rtol=1e-6, atol=1e-6)
    opacity = np.minimum(k[:, 3], 1 - 2.0 ** -24)                    # opacity 1 would be logit +inf: just below 1
    np.testing.assert_allclose(v["opacity"], np.log(opacity / (1 - opacity)), rtol=1e-6)
    assert np.isfinite(v["opacity"]).all() and v["opacity"].max() > 16   # the opacity-1 Gaussian, kept, finite
    np.testing.assert_allclose(col("scale_0", "scale_1", "scale_2"), np.log(k[:, 4:7]), rtol=1e-6)
    quat = col("rot_0", "rot_1", "rot_2", "rot_3")
    np.testing.assert_allclose(quat, k[:, 7:11] / np.linalg.norm(k[:, 7:11], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(quat, axis=1), 1.0, atol=1e-6)


def test_read_ply_returns_the_written_gaussians_after_pruning(tmp_path):
    g = tricky_gaussians()
    write_ply(tmp_path / "object.ply", g)
    back = read_ply(tmp_path / "object.ply")
    expect = g[g[:, 3] >= 0.005].clone()
    expect[:, 7:11] = torch.nn.functional.normalize(expect[:, 7:11], dim=1)
    assert back.dtype == torch.float32 and back.shape == expect.shape
    torch.testing.assert_close(back, expect, rtol=0, atol=1e-6)


def test_read_ply_reads_lgms_layout_without_normals_and_f_rest(tmp_path):
    # 3DTopia/LGM core/gs.py save_ply writes only x y z f_dc_* opacity scale_* rot_*: names come from the header
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    v = np.zeros(2, dtype=[(n, "<f4") for n in names])
    v["x"], v["f_dc_1"], v["opacity"], v["scale_2"], v["rot_0"], v["rot_3"] = [0.1, -0.2], [1.0, -1.0], [0.0, 2.0], \
        [math.log(0.02)] * 2, [2.0, 0.0], [0.0, 1.0]
    path = tmp_path / "lgm.ply"
    header = "\n".join(["ply", "format binary_little_endian 1.0", "comment written by a test", "element vertex 2"]
                       + [f"property float {n}" for n in names] + ["end_header"]) + "\n"
    path.write_bytes(header.encode() + v.tobytes())
    g = read_ply(path)
    assert g.shape == (2, 14)
    torch.testing.assert_close(g[:, 0], torch.tensor([0.1, -0.2]))
    torch.testing.assert_close(g[:, 3], torch.sigmoid(torch.tensor([0.0, 2.0])))
    torch.testing.assert_close(g[:, 6], torch.tensor([0.02, 0.02]))
    torch.testing.assert_close(g[:, 7:11], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))    # normalised
    torch.testing.assert_close(g[:, 12], torch.tensor([0.5 + C0, 0.5 - C0]))


@pytest.mark.parametrize("defect, message", [
    ("missing rot_3", r"rot_3"), ("ascii", r"binary_little_endian"), ("truncated", r"truncated"),
    ("not a ply", r"not a PLY file")])
def test_bad_ply_fails_naming_the_file_and_what_is_wrong(tmp_path, defect, message):
    good = tmp_path / "good.ply"
    write_ply(good, gt_object())
    data = good.read_bytes()
    bad = tmp_path / "bad.ply"
    if defect == "missing rot_3":
        data = data.replace(b"property float rot_3\n", b"")
    elif defect == "ascii":
        data = data.replace(b"binary_little_endian", b"ascii")
    elif defect == "truncated":
        data = data[:-10]
    else:
        data = b"solid cube\n" + data
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        read_ply(bad)
    assert str(bad) in str(err.value)


def test_write_ply_rejects_a_batch_and_non_positive_scales(tmp_path):
    with pytest.raises(ValueError, match=r"ONE object .*gaussians\[0\]"):
        write_ply(tmp_path / "batch.ply", gt_object()[None])
    g = gt_object()
    g[5, 4] = 0.0
    with pytest.raises(ValueError, match="scales must be > 0") as err:
        write_ply(tmp_path / "zero.ply", g)
    assert "zero.ply" in str(err.value)


# ------------------------------------------------------------------------------------------------ orbits

@pytest.mark.parametrize("elevation", [0.0, 15.0])
def test_orbit_cameras_look_at_the_origin_from_the_right_elevation(elevation):
    cams = view3d.orbit_cameras(elevation, radius=1.5)
    assert cams.shape == (72, 4, 4)
    pos = cams[:, :3, 3].double()
    assert torch.allclose(pos.norm(dim=1), torch.full((72,), 1.5, dtype=torch.float64), atol=1e-6)
    # OpenGL: the camera looks along -z of its frame (column 2); that ray must point at the origin
    look = -cams[:, :3, 2].double()
    assert torch.allclose(look, -pos / pos.norm(dim=1, keepdim=True), atol=1e-6)
    assert (cams[:, 1, 1] > 0).all()                                  # image up has a positive world-y part
    # MVDream convention: positive elevation = camera above the object; second ring 30 degrees higher
    elev = torch.rad2deg(torch.asin(pos[:, 1] / 1.5))
    assert torch.allclose(elev[:36], torch.full((36,), elevation, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(elev[36:], torch.full((36,), elevation + 30.0, dtype=torch.float64), atol=1e-4)
    azimuth = torch.rad2deg(torch.atan2(pos[:, 0], pos[:, 2]))
    steps = azimuth.diff() % 360.0                                    # also across the ring change
    assert torch.allclose(steps, torch.full_like(steps, 10.0), atol=1e-4)
    # frames 0, 9, 18, 27 are the cameras of MVDream views 0..3 (LGM's world)
    assert torch.allclose(cams[:36:9], reconstruct.mvdream_view_cameras(elevation, 1.5), atol=1e-5)
    with pytest.raises(ValueError, match="between -90 and 90"):
        view3d.orbit_cameras(70.0)


def test_render_orbit_in_chunks_shows_the_object_from_the_input_cameras():
    g = gt_object()
    frames = view3d.render_orbit(g, world.TOY.elevation, size=64, fovy=world.TOY.fovy, radius=world.TOY.radius)
    assert frames.shape == (72, 3, 64, 64) and frames.device.type == "cpu"
    views = world.render_views(g[None])[0]                              # MVDream views 0..3, same renderer
    torch.testing.assert_close(frames[:36:9], views, rtol=0, atol=1e-5)
    assert (frames[36:] - frames[:36]).abs().mean() > 0.01            # the raised ring sees something else
    few = dict(size=32, views_per_call=3, steps=4)
    torch.testing.assert_close(view3d.render_orbit(g, 15.0, **few), view3d.render_orbit(g, 15.0, **{**few,
                               "views_per_call": 8}), rtol=0, atol=1e-6)   # chunking does not change the frames


def test_orbit_gif_has_every_frame_the_size_and_loops(tmp_path):
    g = gt_object()
    views = world.render_views(g[None])[0]
    frames = view3d.render_orbit(g, 15.0, size=48)
    path = view3d.save_orbit_gif(tmp_path / "orbit.gif", views, frames)
    gif = Image.open(path)
    assert gif.format == "GIF" and gif.size == (96, 48) and gif.info["loop"] == 0
    pictures = [np.asarray(f.convert("RGB"), dtype=np.float64) / 255 for f in ImageSequence.Iterator(gif)]
    assert len(pictures) == 72
    for k in (0, 40):                                  # right half = orbit frame k (GIF palette: small error)
        assert np.abs(pictures[k][:, 48:] - frames[k].permute(1, 2, 0).numpy()).mean() < 0.02
    small_view = np.asarray(view3d._picture(views[0], 24), dtype=np.float64) / 255
    assert np.abs(pictures[5][:24, :24] - small_view).mean() < 0.02   # top left = input view 0, on every frame


# ---------------------------------------------------------------------------------- MRCReward.reconstruct

def test_mrc_reward_reconstruct_is_what_call_renders(reward_fn):
    views = world.ground_truth_views([PROMPT, "a blue ball"], 1, 0)[:, 0]   # (2, 4, 3, 64, 64)
    out = reward_fn(views)
    gaussians = reward_fn.reconstruct(views)
    assert gaussians.shape == (2, 4096, 14)
    rerender = reconstruct.render_gaussians(gaussians, reward_fn.cameras, 49.1, 64, 64)["image"]
    rerender = rerender[:, reward_fn.to_mvdream]                      # back to MVDream view order
    assert torch.equal(rerender, out["renders"])
    # independent path: the views zoomed alike as the fixture's reward does, LGM input order and cameras from
    # reconstruct.py's conventions
    lgm_views = reward.zoom_to_size(views, 0.6, threshold=0.8)[:, list(reconstruct.MVDREAM_TO_LGM)]
    with torch.no_grad():
        direct = reward_fn.lgm.reconstruct(lgm_views, reconstruct.standard_cameras(-world.TOY.elevation, 1.5))
    torch.testing.assert_close(gaussians, direct, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="MVDream view order"):
        reward_fn.reconstruct(views[0])


# -------------------------------------------------------------------------------------- CLI and evaluate

def test_parse_row():
    assert view3d.parse_row("gt") == ("ground truth", None, None)
    assert view3d.parse_row("GT=gt") == ("GT", None, None)
    assert view3d.parse_row(str(SFT_BASE)) == ("sft-base", str(SFT_BASE), None)
    assert view3d.parse_row(f"RL={SFT_BASE}+{SFT_BASE}") == ("RL", str(SFT_BASE), str(SFT_BASE))
    with pytest.raises(ValueError, match="does not exist"):
        view3d.parse_row(f"{SFT_BASE}+no/such/lora")


def test_strip_cli_writes_png_ply_and_gif_per_row_on_identical_noise(tmp_path):
    out = tmp_path / "strip.png"
    view3d.main(["--prompt", PROMPT, "--rows", "gt", str(SFT_BASE), "--num-steps", "4", "--size", "64",
                 "--out", str(out), "--device", "cpu", "--lgm", str(LGM_FILE)])
    strip = Image.open(out)
    tile, cap, header, gap = 64, view3d.CAPTION_PX, view3d.HEADER_PX, view3d.GAP_PX
    assert strip.size == (12 * tile + gap, header + 2 * (cap + tile))
    for k, name in enumerate(["ground_truth", "sft-base"]):
        g = read_ply(tmp_path / f"strip_{k}_{name}.ply")
        assert 0 < len(g) <= 4096 and (g[:, 3] >= 0.005).all()
        assert sum(1 for _ in ImageSequence.Iterator(Image.open(tmp_path / f"strip_{k}_{name}.gif"))) == 72
    # the rows' views: ground-truth renders of object (seed 0, "object", 0, 0), and sft-base sampled from
    # evaluate.py's fixed noise (all of sample 0's noise from generator (seed 0, "noise", 0, 0)), recomputed here
    gt = world.render_views(world.make_object(PROMPT, make_generator("cpu", 0, "object", 0, 0))[None])[0]
    policy = MVDreamPolicy.from_pretrained(str(SFT_BASE)).eval()
    g = make_generator("cpu", 0, "noise", 0, 0)
    draws = torch.randn(1 + 4, 4, *policy.latent_shape, generator=g)  # initial noise, then one draw per step
    sampled = sample_trajectories(policy, [PROMPT], num_steps=4, guidance_scale=5.0, eta=1.0,
                                  initial_noise=draws[None, 0], generator=[make_generator("cpu", 0, "noise", 0, 0)]
                                  )["views"][0]
    pixels = torch.from_numpy(np.asarray(strip.convert("RGB")).copy()).permute(2, 0, 1).int()
    for row, views in enumerate((gt, sampled)):
        views = reward.zoom_to_size(views[None], 0.6, threshold=0.8)[0]  # as the reward sees them (view3d's defaults)
        top = header + row * (cap + tile) + cap
        tiles = torch.stack([pixels[:, top:top + tile, j * tile:(j + 1) * tile] for j in range(4)])
        assert (tiles - (views * 255).round().int()).abs().max() <= 1


def test_evaluate_orbit_writes_the_reconstruction_of_the_first_sample(tmp_path, reward_fn):
    out = tmp_path / "gt"
    evaluate.main(["--ground-truth", "--num-prompts", "2", "--seeds", "1", "--orbit", "1", "--orbit-size", "32",
                   "--device", "cpu", "--lgm", str(LGM_FILE), "--out", str(out)])
    prompts = evaluate.load_prompts("toy:test", 2)
    stem = out / "orbit" / f"00_{view3d.slug(prompts[0])}"
    assert sorted(p.name for p in (out / "orbit").iterdir()) == [stem.name + ".gif", stem.name + ".ply"]
    assert Image.open(stem.with_suffix(".gif")).size == (64, 32)
    views = world.ground_truth_views(prompts[:1], 1, 0)[:, 0]
    expect = reward_fn.reconstruct(views)[0]
    expect = expect[expect[:, 3] >= 0.005]
    torch.testing.assert_close(read_ply(stem.with_suffix(".ply")), expect, rtol=0, atol=1e-6)
