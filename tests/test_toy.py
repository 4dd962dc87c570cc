import math
import re

import pytest
import torch

import reconstruct
from toy import world

TRAIN, TEST = world.train_prompts(), world.test_prompts()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def objects(prompts, seed0=100):
    return torch.stack([world.make_object(p, gen(seed0 + i)) for i, p in enumerate(prompts)])


# ------------------------------------------------------------------------------------------------ grammar

def test_splits_are_disjoint_deterministic_and_cover_the_grammar():
    assert len(set(TRAIN)) == len(TRAIN) and len(set(TEST)) == len(TEST)
    assert not set(TRAIN) & set(TEST)
    assert world.train_prompts() == TRAIN and world.test_prompts() == TEST
    # brute-force enumeration of the grammar, written independently of world._all_prompts
    C, S, D = world.COLORS, world.SHAPES, world.SIDES
    everything = {f"a {c} {s}" for c in C for s in S}
    everything |= {f"a {c} {s} with a {pc} {ps} on its {d}" for c in C for s in S for pc in C for ps in S for d in D
                   if pc != c}
    assert set(TRAIN) | set(TEST) == everything
    assert 0.1 < len(TEST) / len(everything) < 0.5


def test_vocab_is_small_and_every_test_word_is_seen_in_train():
    assert len(world.VOCAB) == len(set(world.VOCAB)) and 15 <= len(world.VOCAB) <= 30
    assert {"a", "with", "on", "its"} <= set(world.VOCAB)
    train_words = {w for p in TRAIN for w in p.split()}
    test_words = {w for p in TEST for w in p.split()}
    assert test_words <= set(world.VOCAB) and test_words <= train_words
    assert train_words == set(world.VOCAB)


def test_held_out_combinations_occur_only_in_test():
    # colour/shape pairs, as main object ("a yellow cube ...") and as part ("... with a yellow cube on ...")
    for color, shape in world.HELD_OUT_COLOR_SHAPE:
        as_main = re.compile(rf"^a {color} {shape}\b")
        as_part = re.compile(rf"with a {color} {shape} on")
        assert any(as_main.search(p) for p in TEST) and any(as_part.search(p) for p in TEST)
        assert not any(as_main.search(p) or as_part.search(p) for p in TRAIN)
        # ...but both words are seen in train in other combinations
        assert any(f" {color} " in p for p in TRAIN) and any(f" {shape}" in p for p in TRAIN)
    for shape, side in world.HELD_OUT_PART_SIDE:
        pat = re.compile(rf"with a \w+ {shape} on its {side}$")
        assert any(pat.search(p) for p in TEST) and not any(pat.search(p) for p in TRAIN)
    # every test prompt contains at least one held-out combination (else it belonged in train)
    held = [re.compile(rf"(^a|with a) {c} {s}\b") for c, s in world.HELD_OUT_COLOR_SHAPE]
    held += [re.compile(rf"{s} on its {d}$") for s, d in world.HELD_OUT_PART_SIDE]
    assert all(any(h.search(p) for h in held) for p in TEST)


def test_parse_round_trip():
    for p in TRAIN + TEST:
        parsed = world.parse_prompt(p)
        assert world.format_prompt(parsed) == p
    parsed = world.parse_prompt("a red cube with a blue ball on its left")
    assert parsed == world.ToyPrompt("red", "cube", "blue", "ball", "left")
    assert world.parse_prompt("a green cone") == world.ToyPrompt("green", "cone")
    assert not world.parse_prompt("a green cone").has_part


@pytest.mark.parametrize("bad, match", [
    ("a red cub", "'cub' is not a valid shape"),
    ("a pink cube", "'pink' is not a valid colour"),
    ("the red cube", "'the' is not a valid first word"),
    ("a red cube with a blue ball on its side", "'side' is not a valid side"),
    ("a red cube with a blue ball", "has 7 words"),
    ("", "has 0 words"),
    ("a red cube with a red ball on its left", "part colour must differ"),
])
def test_bad_prompt_gives_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        world.parse_prompt(bad)
    with pytest.raises(ValueError, match="prompt"):
        world.make_object(bad, gen(0))


# ------------------------------------------------------------------------------------------------ objects

PROMPTS = ["a red cube", "a blue ball with a yellow cone on its top", "a purple cylinder with a green cube on its back",
           "a yellow cone with a red cylinder on its left"]


def test_make_object_is_deterministic_valid_and_varies_with_seed():
    for p in PROMPTS:
        a, b, c = world.make_object(p, gen(3)), world.make_object(p, gen(3)), world.make_object(p, gen(4))
        assert a.shape == (world.TOY.num_gaussians, 14) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.isfinite(a).all()
        vis = a[:, 3] > 0
        assert 600 <= int(vis.sum()) <= world.TOY.num_gaussians
        xyz, op, sc, q, rgb = a[vis, :3], a[:, 3], a[vis, 4:7], a[vis, 7:11], a[:, 11:]
        assert xyz.abs().max() <= 0.5                          # inside LGM's box with margin
        assert ((op >= 0) & (op <= 1)).all() and ((rgb >= 0) & (rgb <= 1)).all()
        assert (sc > 0).all() and sc.max() < 0.05
        assert torch.allclose(q.norm(dim=-1), torch.ones(len(q)), atol=1e-5)
        # centred on its bounding box (like LGM's recentring)
        assert torch.allclose(xyz.min(0).values + xyz.max(0).values, torch.zeros(3), atol=1e-5)


def test_render_views_deterministic_and_shaped():
    g1 = objects(PROMPTS[:2], seed0=7)
    g2 = objects(PROMPTS[:2], seed0=7)
    v1, v2 = world.render_views(g1), world.render_views(g2)
    assert v1.shape == (2, 4, 3, 64, 64) and torch.equal(v1, v2)
    assert not torch.equal(v1, world.render_views(objects(PROMPTS[:2], seed0=8)))
    # white background at the border, object in the middle
    assert (v1[..., 0, :] == 1).all() and (v1[..., 32, 32].amax(-1) < 0.95).all()


def test_sides_match_mvdream_view_0_camera():
    # The documented frame: view 0's camera looks from `front`, its image-right axis is `right`.
    c2w = reconstruct.mvdream_view_cameras(0.0)[0]
    right, towards_camera = c2w[:3, 0], c2w[:3, 2]
    assert torch.allclose(right, torch.tensor(world.SIDE_DIRECTIONS["right"]), atol=1e-6)
    assert torch.allclose(-right, torch.tensor(world.SIDE_DIRECTIONS["left"]), atol=1e-6)
    assert torch.allclose(towards_camera, torch.tensor(world.SIDE_DIRECTIONS["front"]), atol=1e-6)
    assert torch.allclose(-towards_camera, torch.tensor(world.SIDE_DIRECTIONS["back"]), atol=1e-6)
    # and the part's Gaussians really sit on that side in view 0's camera frame (elevation 15)
    c2w = reconstruct.mvdream_view_cameras(world.TOY.elevation, world.TOY.radius)[0]
    for side, seed in ((s, seed) for s in world.SIDES for seed in range(10)):    # any size, offset and yaw
        g = world.make_object(f"a green cube with a red ball on its {side}", gen(seed))
        main, part = g[: world.N_MAIN, :3].mean(0), g[world.N_MAIN:, :3][g[world.N_MAIN:, 3] > 0].mean(0)
        cam = lambda x: (x - c2w[:3, 3]) @ c2w[:3, :3]  # noqa: E731  (x right, y up, z towards the viewer)
        d = cam(part) - cam(main)
        expect = {"left": d[0] < -0.2, "right": d[0] > 0.2, "front": d[2] > 0.2, "back": d[2] < -0.2, "top": d[1] > 0.2}
        assert expect[side], (side, d)


def _colour_stats(views, name):
    mask = (world.palette_classes(views) == world.COLORS.index(name)).float()        # (..., H, W)
    xs = torch.arange(views.shape[-1], dtype=torch.float32)
    count = mask.sum((-1, -2))
    cx = (mask.sum(-2) * xs).sum(-1) / count.clamp(min=1)
    cy = (mask.sum(-1) * xs).sum(-1) / count.clamp(min=1)
    return count, cx, cy


def test_part_semantics_in_the_images():
    # view j looks from azimuth 90*(j-1): view 0 from the front, 1 from the right, 2 from the back, 3 from the left
    sides = ["left", "right", "front", "back", "top"]
    prompts = [f"a green cube with a red ball on its {s}" for s in sides]
    v = world.render_views(objects(prompts, seed0=20))
    red_n, red_x, red_y = _colour_stats(v, "red")
    _, green_x, green_y = _colour_stats(v, "green")
    left, right, front, back, top = range(5)
    full = red_n.max()
    # left part: image-left in view 0, hidden in view 1, image-right in view 2, in front (largest) in view 3
    assert red_x[left, 0] < 24 and red_x[left, 0] < green_x[left, 0] - 10
    assert red_n[left, 1] < 0.05 * full and red_x[left, 2] > 40 and red_n[left, 3] == red_n[left].max()
    assert red_x[right, 0] > 40 and red_x[right, 2] < 24 and red_n[right, 3] < 0.05 * full
    # front part: centred in view 0, below the main's centre (on the ground, nearer), hidden from the back view
    assert abs(red_x[front, 0] - 31.5) < 6 and red_y[front, 0] > green_y[front, 0] + 5
    assert red_n[front, 2] < 0.05 * full and red_n[front, 0] == red_n[front].max()
    assert red_n[back, 0] < 0.05 * full and red_n[back, 2] == red_n[back].max()
    # top part: above the main object in every view and visible in all of them
    assert (red_y[top] < green_y[top] - 10).all() and (red_n[top] > 0.5 * red_n[top].max()).all()


# ------------------------------------------------------------------------------------------------ batches

def test_make_batch_cameras_are_consistent_with_its_renders():
    prompts = ["a red cube with a blue cone on its right", "a green ball"]
    b = world.make_batch(prompts, gen(1), extra_views=3)
    assert b["views"].shape == (2, 4, 3, 64, 64) and b["extra_views"].shape == (2, 3, 3, 64, 64)
    assert b["extra_c2w"].shape == (2, 3, 4, 4) and b["gaussians"].shape == (2, world.TOY.num_gaussians, 14)
    assert b["prompts"] == prompts
    b2 = world.make_batch(prompts, gen(1), extra_views=3)
    assert all(torch.equal(b[k], b2[k]) for k in ("views", "extra_views", "extra_c2w", "gaussians"))
    # LGM inputs: rendering the Gaussians at the LGM cameras reproduces the reordered views
    lgm = reconstruct.render_gaussians(b["gaussians"], b["lgm_cameras"], world.TOY.fovy, 64, 64)["image"]
    assert torch.allclose(lgm, b["lgm_views"], atol=1e-5)
    assert torch.equal(b["lgm_views"], b["views"][:, [1, 2, 3, 0]])
    extra = reconstruct.render_gaussians(b["gaussians"], b["extra_c2w"], world.TOY.fovy, 64, 64)["image"]
    assert torch.allclose(extra, b["extra_views"], atol=1e-5)
    # extra cameras: on the radius-1.5 sphere, looking at the origin, MVDream elevation in [-10, 40]
    pos = b["extra_c2w"][..., :3, 3]
    assert torch.allclose(pos.norm(dim=-1), torch.full((2, 3), 1.5), atol=1e-5)
    assert torch.allclose(b["extra_c2w"][..., :3, 2], pos / 1.5, atol=1e-5)
    elev = torch.rad2deg(torch.asin(pos[..., 1] / 1.5))
    assert ((elev >= -10 - 1e-3) & (elev <= 40 + 1e-3)).all()
    assert b["extra_views"].amin((-1, -2, -3)).lt(0.95).all()       # the object is in every extra view


def test_random_cameras_deterministic():
    a, b = world.random_cameras(5, gen(2)), world.random_cameras(5, gen(2))
    assert a.shape == (5, 4, 4) and torch.equal(a, b) and not torch.equal(a, world.random_cameras(5, gen(3)))


# ------------------------------------------------------------------------------------------------ palette colours
# (the prompt-fidelity metric built on them is tested in tests/test_fidelity.py)

def test_hue_classifier_against_known_colours():
    # palette colours, their shaded and white-blended versions -> their class; white, grey -> bg / other
    rgb = torch.tensor(list(world.PALETTE.values()))
    shaded, blended = 0.6 * rgb, 0.5 * rgb + 0.5
    img = torch.cat([rgb, shaded, blended, torch.tensor([[1.0, 1, 1], [0.5, 0.5, 0.5]])]).T[:, None, :]  # (3,1,17)
    cls = world.palette_classes(img)[0].tolist()
    assert cls == list(range(5)) * 3 + [-1, 5]


# ------------------------------------------------------------------------------------------------ distortions

VIEW_PROMPTS = ["a red cube with a blue ball on its left", "a green cone with a purple cube on its top",
                "a yellow ball"]


@pytest.fixture(scope="module")
def gt_views():
    return world.render_views(objects(VIEW_PROMPTS, seed0=500))


@pytest.mark.parametrize("kind", world.DISTORTIONS)
def test_distort_view_identity_and_monotone(kind, gt_views):
    view = gt_views[0, 0]
    assert torch.equal(world.distort_view(view, kind, 0, gen(9)), view)
    diffs = [(world.distort_view(view, kind, lvl, gen(9)) - view).abs().mean().item() for lvl in (0, 1, 2, 4, 8)]
    assert all(b > a for a, b in zip(diffs, diffs[1:])), diffs
    out = world.distort_view(view, kind, 3, gen(9))
    assert out.shape == view.shape and out.min() >= 0 and out.max() <= 1


def test_distort_view_geometry():
    view = world.render_views(objects(["a red ball"], seed0=1))[0, 0]
    _, x0, y0 = _colour_stats(view, "red")
    shifted = world.distort_view(view, "shift", 5, gen(4))
    _, x1, y1 = _colour_stats(shifted, "red")
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(5 * world.SHIFT_PX_PER_LEVEL, abs=0.8)
    assert shifted[:, 0, :].eq(1).all() and shifted[:, -1, :].eq(1).all()        # white fill
    recolored = world.distort_view(view, "recolor", 9, gen(4))                         # 180 deg hue turn
    n_red = _colour_stats(view, "red")[0]
    assert _colour_stats(recolored, "red")[0] < 0.05 * n_red
    blob = world.distort_view(view, "blob", 6 / world.BLOB_PX_PER_LEVEL, gen(4))        # radius 6 px
    added = world.palette_classes(blob) != world.palette_classes(view)
    assert 80 < int(added.sum()) < 150                                                # ~ pi * 6^2 = 113 pixels


def test_distort_view_bad_input(gt_views):
    with pytest.raises(ValueError, match="kind"):
        world.distort_view(gt_views[0, 0], "blur", 1, gen(0))
    with pytest.raises(ValueError, match="level"):
        world.distort_view(gt_views[0, 0], "shift", -1, gen(0))
    with pytest.raises(ValueError, match="view"):
        world.distort_view(gt_views[0], "shift", 1, gen(0))
