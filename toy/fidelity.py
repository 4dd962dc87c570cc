# toy/fidelity.py — prompt fidelity of 4-view samples in the toy world (toy/world.py): does each view show what the
# prompt asks for, where ground truth shows it? evaluate.py reports it as fidelity_mean / fidelity_std.
#
# Why not colour histograms: they count every non-white pixel, so background noise and a collapsed policy
# (every prompt drawn as one red blob) land in the same narrow band. Here each view is segmented into colour
# regions that survive pixel noise, and the regions are compared with ground-truth renders of the same prompt at
# the same camera, check by check, so a score says what is wrong (per_check=True).
#
# Segmentation (_segment, _measure). Pixels get world.palette_classes' hue classes; "solid" = a palette colour
# with min RGB <= 0.6 (objects are saturated even where lit; the noise is pale speckle). Regions: box-blur
# 3x3, then each pixel takes the majority solid colour of its 5x5 window (where >= half of it is solid). The
# main object / the part = the connected region of its colour around that colour's densest 9x9 window.
# Silhouettes use the unblurred solid pixels of that colour within 2 px of the region, closed by 1 px.
#
# Ground truth (_measured_geometry, _expected): world.make_object with TEMPLATE_SEEDS (disjoint from any
# seed the tests draw), rendered at the sample's elevation and resolution, measured by the same code, cached
# per geometry (main shape, part shape, side): colours do not change the geometry, so canonical colours
# serve every colouring. Expected values are means over the seeds.
#
# Checks, per sample and MVDream view j, each c in [0, 1] (1 = passes; 1 where a check does not apply).
# ramp(x; a -> b) = clamp((x - a) / (b - a), 0, 1); q(obs, exp) = min(r, 1/r) with r = obs / exp.
#   main        (a) the main colour's region has a plausible area:  c = ramp(q(area, GT area at j); 0.25 -> 0.5)
#               (full credit within a factor 2, none beyond 4; new GT seeds measure 0.71-1.43x the mean)
#   shape       (b) the main region's silhouette, cropped to its bounding box, padded to a square (aspect
#               kept) and resampled to 16x16, is nearest to the prompt's shape: d_k = mean |sil - template|
#               for the nearest seed of shape k, where the templates of shape k are ground truth of the same
#               prompt with the main shape swapped to k (same part and side, so the part occludes the
#               templates as it occludes the sample);  c = ramp(min_{k' != k} d_k' - d_k; -0.04 -> 0.04)
#   part        (c) prompts with a part, where ground truth shows it (GT area at j >= 25% of its largest
#               view): c = ramp(q(part area, GT area at j); 0.15 -> 0.4); where ground truth hides it:
#               c = 1 - ramp(part area / GT largest part area; 0.1 -> 0.4)
#   side        (c) where ground truth shows the part: the direction from the main region's centroid to the
#               part's agrees with ground truth's: c = ramp(cosine; 0.2 -> 0.6), 0 if the part is absent
#   part_shape  (c) where ground truth shows the part and it looks whole (area >= 60% of GT's largest): as
#               `shape` for the part, templates from the prompt with the part shape swapped
#   clean       (d) nothing else: e = ink (1 - min RGB) outside the main and part regions dilated by 2 px,
#               over their expected area;  c = 1 - ramp(e; 0.05 -> 0.5). Other colours and noise both count.
# Per view:  s_j = main_j * prod_k (1 - w_k * (1 - c_kj)),  w: shape 0.5, part 0.6, side 0.5,
#            part_shape 0.4, clean 0.5.           Score = mean_j s_j in [0, 1].
# The main object gates a view (wrong colour or no object: 0); any other failed check costs a fixed
# fraction of it, so a view that misses its part keeps 0.4 * 0.5 = 20% and noise alone keeps 50%.
#
# Ground truth of unseen seeds scores near 1 and each controlled corruption (part dropped, recoloured or on the
# wrong side, shapes swapped, blur, noise, blank, collapse) far lower: tests/test_fidelity.py checks both, and
# `python -m toy.fidelity` prints them. Ground truth loses points only where a large part hides most of the main
# object, or on the shape of ~12-16 px parts, whose bounding boxes are a few pixels wide.
import math
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from toy import world

NUM_COLORS = len(world.COLORS)

# Segmentation
SOLID_MAX = 0.6            # a solid pixel's min RGB: objects <= 0.6 even where lit, the models' noise is paler
BLUR = 3                   # box blur before classifying: averages the models' 2x2 speckle pattern
MODE_WINDOW = 5            # majority window of the regions: isolated noise pixels do not form a region
SEED_WINDOW = 9            # a colour's object grows from its densest 9x9 window
SILHOUETTE_DILATE = 2      # silhouettes: unblurred pixels within 2 px of the region (the 5x5 majority rounds
                           # a ~12 px part off)
INK_DILATE = 2             # `clean` ignores the anti-aliased rim within 2 px of the regions
DESC = 16                  # silhouette descriptor size

# Ground truth
TEMPLATE_SEEDS = tuple(range(1000, 1008))  # 8: with 4 seeds a small ball on top read as a cube more often
                                           # (GT min 0.87 vs 0.92 over 60 prompts, 0.66 vs 0.99 over 24 seeds
                                           # of "a red cube with a blue ball on its top")
CANON_MAIN, CANON_PART = "red", "blue"     # measured areas of one geometry vary < 1% over the colours

# Checks (formula at the top)
MAIN_RAMP = (0.25, 0.5)
PART_RAMP = (0.15, 0.4)    # new GT seeds' part areas are 0.52-1.72x the mean (size and partial occlusion)
HIDDEN_RAMP = (0.1, 0.4)
VISIBLE_FRAC = 0.25        # GT part area at j / largest (mean over seeds): hidden views 0, shown ones >= 0.43
WHOLE_FRAC = 0.6
SIDE_RAMP = (0.2, 0.6)     # new GT seeds' cosines are >= 0.80
SHAPE_TAU = 0.04
CLEAN_RAMP = (0.05, 0.5)   # GT's own e is < 0.001
MIN_PART_PX = 4
WEIGHTS = {"shape": 0.5, "part": 0.6, "side": 0.5, "part_shape": 0.4, "clean": 0.5}
CHECKS = ("main",) + tuple(WEIGHTS)


def _ramp(x, lo, hi):
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Measuring one view: colour regions, their areas, centroids and silhouettes
# ---------------------------------------------------------------------------------------------------------
def _segment(views):
    # (N, 3, H, W) -> regions, classes: (N, H, W) long, -1 = none, 0..4 = palette colour (world.palette_classes).
    # regions: blurred, then the majority solid colour of each 5x5 window where half the window is solid;
    # classes: the solid colour class of each unblurred pixel
    blur = F.avg_pool2d(views, BLUR, 1, BLUR // 2, count_include_pad=False)
    cls = world.palette_classes(blur)
    solid = (cls >= 0) & (cls < NUM_COLORS) & (blur.amin(1) <= SOLID_MAX)
    onehot = F.one_hot(cls.clamp(0, NUM_COLORS - 1), NUM_COLORS).permute(0, 3, 1, 2).float() * solid[:, None]
    local = F.avg_pool2d(onehot, MODE_WINDOW, 1, MODE_WINDOW // 2, count_include_pad=False)
    regions = torch.where(local.sum(1) >= 0.5, local.argmax(1), -1)
    raw = world.palette_classes(views)
    classes = torch.where((raw < NUM_COLORS) & (views.amin(1) <= SOLID_MAX), raw, -1)
    return regions, classes


def _dilate(mask, r):
    # (N, H, W) bool, 3x3 dilation r times, with shifted copies (bool ops: ~10x faster than max_pool2d on one
    # CPU thread)
    for _ in range(r):
        pad = torch.zeros_like(mask[..., :1])
        mask = mask | torch.cat([mask[..., 1:], pad], -1) | torch.cat([pad, mask[..., :-1]], -1)
        pad = torch.zeros_like(mask[..., :1, :])
        mask = mask | torch.cat([mask[..., 1:, :], pad], -2) | torch.cat([pad, mask[..., :-1, :]], -2)
    return mask


def _area_centroid(mask):
    # (N, H, W) bool -> area (N,), centroid (N, 2) as (x, y) in pixels (0 for an empty mask)
    m = mask.float()
    area = m.sum((1, 2))
    ys = torch.arange(m.shape[1], dtype=m.dtype)
    xs = torch.arange(m.shape[2], dtype=m.dtype)
    cx = (m.sum(1) * xs).sum(1) / area.clamp(min=1)
    cy = (m.sum(2) * ys).sum(1) / area.clamp(min=1)
    return area, torch.stack([cx, cy], -1)


def _silhouette(mask):
    # (N, H, W) bool -> (N, DESC, DESC): the mask cropped to its bounding box, centred in a square of the
    # box's longer side (so the aspect ratio is kept: a cylinder is narrower than a cube), resampled at 2x
    # and box-filtered down (anti-aliased). An empty mask gives zeros.
    n, h, w = mask.shape
    rows, cols = mask.any(2), mask.any(1)
    iy, ix = torch.arange(h), torch.arange(w)
    y0, y1 = torch.where(rows, iy, h).amin(1), torch.where(rows, iy, -1).amax(1)
    x0, x1 = torch.where(cols, ix, w).amin(1), torch.where(cols, ix, -1).amax(1)
    half = (torch.maximum(x1 - x0, y1 - y0) + 1).clamp(min=1).float() / 2
    k = 2 * DESC
    t = (torch.arange(k, dtype=torch.float32) + 0.5) / k * 2 - 1                   # cell centres in (-1, 1)
    px = (x0 + x1).float()[:, None] / 2 + half[:, None] * t                       # (n, k) pixel coordinates
    py = (y0 + y1).float()[:, None] / 2 + half[:, None] * t
    gx, gy = (px + 0.5) / w * 2 - 1, (py + 0.5) / h * 2 - 1                       # grid_sample, align_corners=False
    grid = torch.stack([gx[:, None, :].expand(n, k, k), gy[:, :, None].expand(n, k, k)], -1)
    out = F.avg_pool2d(F.grid_sample(mask.float()[:, None], grid, align_corners=False), 2)[:, 0]
    return out * rows.any(1)[:, None, None]


def _main_component(mask):
    # (N, H, W) bool -> the connected part of each mask around its densest 9x9 window (the largest blob in
    # practice): grown from that seed by dilating within the mask until it stops changing
    density = F.avg_pool2d(mask[:, None].float(), SEED_WINDOW, 1, SEED_WINDOW // 2)[:, 0].flatten(1)
    seed = torch.zeros_like(mask).flatten(1)
    seed[torch.arange(len(mask)), density.argmax(1)] = True
    grown = seed.view_as(mask) & mask
    for _ in range(mask.shape[-1] * mask.shape[-2]):
        nxt = _dilate(grown, 1) & mask
        if torch.equal(nxt, grown):
            break
        grown = nxt
    return grown


def _erode(mask, r):
    return ~_dilate(~mask, r)


def _silhouette_mask(classes, color_idx, region):
    # the unblurred pixels of the region's colour within 2 px of the region (crisp edges: the 5x5 majority
    # rounds a ~12 px part off), closed by 1 px to fill the speckle holes of the models' samples
    near = (classes == color_idx[:, None, None]) & _dilate(region, SILHOUETTE_DILATE)
    return _erode(_dilate(near, 1), 1)


def _measure(views, main_idx, part_idx):
    # views (N, 3, H, W) in [0, 1]; main_idx, part_idx (N,) palette indices (part -1 = no part). The main
    # object and the part are one connected region each: stray noise of their colour elsewhere is left to
    # the `clean` check instead of moving the centroid and the bounding box.
    regions, classes = _segment(views)
    main = _main_component(regions == main_idx[:, None, None])
    part = _main_component((regions == part_idx[:, None, None]) & (part_idx >= 0)[:, None, None])
    main_area, main_c = _area_centroid(main)
    part_area, part_c = _area_centroid(part)
    ink = 1 - views.amin(1)
    return {
        "main_area": main_area, "part_area": part_area, "offset": part_c - main_c,
        "main_sil": _silhouette(_silhouette_mask(classes, main_idx, main)),
        "part_sil": _silhouette(_silhouette_mask(classes, part_idx, part)),
        "extra_ink": (ink * ~_dilate(main | part, INK_DILATE)).sum((1, 2)),
    }


# ---------------------------------------------------------------------------------------------------------
# Ground truth: what the checks expect of a prompt at each view, measured on renders of world.make_object
# ---------------------------------------------------------------------------------------------------------
_MEASURED: dict = {}   # (shape, part_shape, side, elevation, resolution) -> measurements (S, 4, ...)
_EXPECTED: dict = {}   # same key -> what a sample of that geometry should show (see _expected)


def _measured_geometry(shape, part_shape, side, elevation, resolution):
    # A geometry's renders depend on the shapes and the side, not on the colours (world.make_object draws the
    # same random numbers for any colour), so one canonical colouring serves every prompt of that geometry
    key = (shape, part_shape, side, float(elevation), int(resolution))
    if key not in _MEASURED:
        prompt = world.format_prompt(world.ToyPrompt(CANON_MAIN, shape, part_shape and CANON_PART, part_shape, side))
        objs = torch.stack([world.make_object(prompt, torch.Generator().manual_seed(s)) for s in TEMPLATE_SEEDS])
        views = world.render_views(objs, elevation, resolution).flatten(0, 1)        # (S * 4, 3, H, W)
        n = len(views)
        main_idx = torch.full((n,), world.COLORS.index(CANON_MAIN))
        part_idx = torch.full((n,), world.COLORS.index(CANON_PART) if part_shape else -1)
        m = _measure(views, main_idx, part_idx)
        _MEASURED[key] = {k: v.view(len(TEMPLATE_SEEDS), 4, *v.shape[1:]) for k, v in m.items()}
    return _MEASURED[key]


def _expected(p: world.ToyPrompt, elevation, resolution):
    # -> dict of tensors: main_area (4,), part_area (4,), part_full (), offset (4, 2), main_templates and
    # part_templates (4 shapes, S, 4 views, DESC, DESC). Templates of the main shape come from the same prompt
    # with the main shape swapped (same part, same side: the part occludes them as it occludes the sample),
    # those of the part shape from the prompt with the part shape swapped.
    key = (p.shape, p.part_shape, p.side, float(elevation), int(resolution))
    if key not in _EXPECTED:
        own = _measured_geometry(p.shape, p.part_shape, p.side, elevation, resolution)
        main_t = torch.stack([_measured_geometry(k, p.part_shape, p.side, elevation, resolution)["main_sil"]
                              for k in world.SHAPES])
        if p.has_part:
            part_t = torch.stack([_measured_geometry(p.shape, k, p.side, elevation, resolution)["part_sil"]
                                  for k in world.SHAPES])
        else:
            part_t = torch.zeros_like(main_t)
        part_area = own["part_area"].mean(0)
        # where the part hides in some seeds their offset means nothing: weight each seed by the part's area
        offset = (own["offset"] * own["part_area"][..., None]).sum(0) / own["part_area"].sum(0).clamp(min=1)[:, None]
        _EXPECTED[key] = {"main_area": own["main_area"].mean(0), "part_area": part_area,
                          "part_full": part_area.max(), "offset": offset,
                          "main_templates": main_t, "part_templates": part_t}
    return _EXPECTED[key]


# ---------------------------------------------------------------------------------------------------------
# Checks and score
# ---------------------------------------------------------------------------------------------------------
def _shape_check(sil, templates, true_idx):
    # sil (B, 4, D, D); templates (B, K, S, 4, D, D); true_idx (B,) -> (B, 4): soft "the true shape is the
    # nearest" with nearest-template (over seeds) mean absolute distances
    d = (templates - sil[:, None, None]).abs().mean((-1, -2)).amin(2)                  # (B, K, 4)
    is_true = F.one_hot(true_idx, d.shape[1]).bool()[..., None]                        # (B, K, 1)
    own = d.masked_fill(~is_true, math.inf).amin(1)
    other = d.masked_fill(is_true, math.inf).amin(1)
    return _ramp(other - own, -SHAPE_TAU, SHAPE_TAU)


def _size_check(observed, expected, ramp):
    r = observed / expected.clamp(min=1e-6)
    return _ramp(torch.minimum(r, 1 / r.clamp(min=1e-6)), *ramp)


def _checks(obs, exp, shape_idx, part_shape_idx, has_part):
    # obs: measurements (B, 4, ...); exp: stacked expectations (B, ...) -> {check: (B, 4)}
    one = torch.ones_like(obs["main_area"])
    c = {"main": _size_check(obs["main_area"], exp["main_area"], MAIN_RAMP),
         "shape": _shape_check(obs["main_sil"], exp["main_templates"], shape_idx)}
    full = exp["part_full"].clamp(min=1e-6)[:, None]
    visible = has_part[:, None] & (exp["part_area"] >= VISIBLE_FRAC * full)
    hidden = has_part[:, None] & ~visible
    present = obs["part_area"] >= MIN_PART_PX
    c["part"] = torch.where(visible, _size_check(obs["part_area"], exp["part_area"], PART_RAMP), one)
    c["part"] = torch.where(hidden, 1 - _ramp(obs["part_area"] / full, *HIDDEN_RAMP), c["part"])
    cos = F.cosine_similarity(obs["offset"], exp["offset"], dim=-1)
    c["side"] = torch.where(visible, _ramp(cos, *SIDE_RAMP) * present, one)
    whole = visible & (obs["part_area"] >= WHOLE_FRAC * full)
    c["part_shape"] = torch.where(whole, _shape_check(obs["part_sil"], exp["part_templates"], part_shape_idx), one)
    expected_ink = (exp["main_area"] + exp["part_area"]).clamp(min=1.0)
    c["clean"] = 1 - _ramp(obs["extra_ink"] / expected_ink, *CLEAN_RAMP)
    return c


def _check_inputs(views, prompts, elevation):
    if not isinstance(views, torch.Tensor) or views.dim() != 5 or views.shape[1:3] != (world.TOY.num_views, 3):
        got = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ValueError(f"views must be a (B, 4, 3, H, W) tensor in MVDream view order, got {got}")
    if views.shape[-1] != views.shape[-2] or views.shape[-1] < 16:
        raise ValueError(f"views must be square and at least 16x16, got {views.shape[-2]}x{views.shape[-1]}")
    if isinstance(prompts, str) or len(prompts) != views.shape[0]:
        n = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"got {n} for {views.shape[0]} samples; pass a list with one prompt per sample")
    if not views.is_floating_point():
        raise ValueError(f"views must be float images in [0, 1], got dtype {views.dtype} (divide uint8 by 255)")
    if not torch.isfinite(views).all():
        raise ValueError("views contain NaN or inf; expected images in [0, 1]")
    if views.numel() and (views.min() < -1e-3 or views.max() > 1 + 1e-3):
        raise ValueError(f"views must be in [0, 1] (MVDreamPolicy.decode's range), got values in "
                         f"[{views.min().item():.3g}, {views.max().item():.3g}]; map [-1, 1] images with x / 2 + 0.5")
    if not isinstance(elevation, (int, float)) or not math.isfinite(elevation):
        raise ValueError(f"elevation must be a finite number of degrees (MVDream convention), got {elevation!r}")


def fidelity(views: torch.Tensor, prompts: list[str], elevation: float = world.TOY.elevation, per_check: bool = False):
    """Prompt fidelity of (B, 4, 3, H, W) views in [0, 1] (MVDream view order, white background) -> (B,) in
    [0, 1]; 1 = every view shows the prompt's objects as ground truth does. per_check=True also returns
    {check name: (B, 4) per-view check values in [0, 1], "view": (B, 4) per-view scores} (formula: top of file)."""
    _check_inputs(views, prompts, elevation)
    if views.shape[0] == 0:
        empty = views.new_zeros(0)
        return (empty, {k: views.new_zeros(0, 4) for k in CHECKS + ("view",)}) if per_check else empty
    return _fidelity(views, *_observe(views, prompts, elevation), per_check)


def _fidelity(views, parsed, exp, obs, part_idx, per_check=False):
    shape_idx = torch.tensor([world.SHAPES.index(p.shape) for p in parsed])
    part_shape_idx = torch.tensor([world.SHAPES.index(p.part_shape) if p.has_part else 0 for p in parsed])
    checks = _checks(obs, exp, shape_idx, part_shape_idx, part_idx >= 0)
    per_view = checks["main"]
    for name, w in WEIGHTS.items():
        per_view = per_view * (1 - w * (1 - checks[name]))
    score = per_view.mean(1).to(views.device)
    return (score, {**checks, "view": per_view}) if per_check else score


def _observe(views, prompts, elevation):
    # measurements of every view (B, 4, ...) and what ground truth of each prompt shows there
    parsed = [world.parse_prompt(p) for p in prompts]
    b, h = views.shape[0], views.shape[-1]
    per_prompt = [_expected(p, elevation, h) for p in parsed]
    exp = {k: torch.stack([e[k] for e in per_prompt]) for k in per_prompt[0]}
    main_idx = torch.tensor([world.COLORS.index(p.color) for p in parsed])
    part_idx = torch.tensor([world.COLORS.index(p.part_color) if p.has_part else -1 for p in parsed])
    flat = views.detach().float().cpu().clamp(0.0, 1.0).flatten(0, 1)
    obs = _measure(flat, main_idx.repeat_interleave(4), part_idx.repeat_interleave(4))
    return parsed, exp, {k: v.view(b, 4, *v.shape[1:]) for k, v in obs.items()}, part_idx


def size_spread(views: torch.Tensor, prompts: list[str], elevation: float = world.TOY.elevation):
    """Cross-view inconsistency of size, measured without any reconstruction: per sample, the std over its 4
    views of log(main object's area / ground truth's mean area at that view) -> (B,). One object seen from 4
    cameras keeps the ratio nearly constant (its size is one draw); 4 instances of the prompt (toy/sft.py's
    independent examples) do not. An absent main object counts as 4 pixels."""
    _check_inputs(views, prompts, elevation)
    if views.shape[0] == 0:
        return views.new_zeros(0)
    return _size_spread(views, *_observe(views, prompts, elevation))


def _log_size_ratio(obs, exp):
    # (B, 4): log(main object's area / ground truth's mean area at that view); an absent object counts as 4 px
    return (obs["main_area"].clamp(min=4.0) / exp["main_area"]).log()


def _size_spread(views, parsed, exp, obs, part_idx):
    return _log_size_ratio(obs, exp).std(1).to(views.device)


def size_bias(views: torch.Tensor, prompts: list[str], elevation: float = world.TOY.elevation):
    """How much larger than ground truth the main object is drawn: per sample, the mean over its 4 views of the
    log area ratio that size_spread takes the std of -> (B,). 0 = ground truth's size; an object f times larger
    in 3D covers ~f^2 the area, so ~2 log f. The toy's MRC changes with the size a consistent object is drawn at,
    so evaluate.py compares a model's MRC with ground truth's drawn at the model's size."""
    _check_inputs(views, prompts, elevation)
    if views.shape[0] == 0:
        return views.new_zeros(0)
    return _size_bias(views, *_observe(views, prompts, elevation))


def _size_bias(views, parsed, exp, obs, part_idx):
    return _log_size_ratio(obs, exp).mean(1).to(views.device)


def fidelity_and_size(views: torch.Tensor, prompts: list[str], elevation: float = world.TOY.elevation):
    """fidelity, size_spread and size_bias of the views, from one measurement (evaluate.py, train.py's validation)
    -> three (B,) tensors."""
    _check_inputs(views, prompts, elevation)
    if views.shape[0] == 0:
        return views.new_zeros(0), views.new_zeros(0), views.new_zeros(0)
    observed = _observe(views, prompts, elevation)
    return _fidelity(views, *observed), _size_spread(views, *observed), _size_bias(views, *observed)


# ---------------------------------------------------------------------------------------------------------
# Demo: python -m toy.fidelity -> ground truth vs controlled corruptions for 3 prompts (a few seconds)
# ---------------------------------------------------------------------------------------------------------
def _render(prompts, seed):
    objs = torch.stack([world.make_object(p, torch.Generator().manual_seed(seed)) for p in prompts])
    return world.render_views(objs)


def _corruptions(prompt, seed):
    # name -> (4, 3, H, W) views that should score below the ground truth of `prompt`
    p = world.parse_prompt(prompt)
    gt = _render([prompt], seed)[0]
    other_side = {"left": "right", "right": "left", "front": "back", "back": "front", "top": "front"}
    spare = [c for c in world.COLORS if c not in (p.color, p.part_color)][0]
    variants = {"part dropped": p._replace(part_color=None, part_shape=None, side=None),
                "part recoloured": p._replace(part_color=spare),
                "part on another side": p._replace(side=other_side[p.side]),
                "main shape swapped": p._replace(shape=world.SHAPES[(world.SHAPES.index(p.shape) + 1) % 4]),
                "one ball of the main colour": world.ToyPrompt(p.color, "ball"),
                "red ball (collapse)": world.ToyPrompt("red", "ball")}
    names = list(variants)
    out = dict(zip(names, _render([world.format_prompt(v) for v in variants.values()], seed)))
    white = gt.amin(0, keepdim=True) > 0.999
    g = torch.Generator().manual_seed(seed)
    pastel = 1 - 0.5 * torch.rand(gt.shape, generator=g)
    out["background noise"] = torch.where(white & (torch.rand(white.shape, generator=g) < 0.6), pastel, gt)
    out["blurred (sigma 6)"] = TF.gaussian_blur(gt, 25, 6.0)
    out["blank"] = torch.ones_like(gt)
    return gt, out


if __name__ == "__main__":
    torch.set_num_threads(1)
    demo = ["a red cube with a blue ball on its left", "a green cone with a purple cube on its top",
            "a yellow cylinder with a red cone on its front"]
    t0 = time.perf_counter()
    rows = {}
    for i, prompt in enumerate(demo):
        gt, bad = _corruptions(prompt, 5000 + i)
        names = ["ground truth (new seed)"] + list(bad)
        scores = fidelity(torch.stack([gt, *bad.values()]), [prompt] * len(names))
        for name, s in zip(names, scores.tolist()):
            rows.setdefault(name, []).append(s)
    print("fidelity".ljust(28) + "".join(f"  prompt {i}" for i in range(len(demo))))
    for name, scores in rows.items():
        print(name.ljust(28) + "".join(f"  {s:8.3f}" for s in scores))
    print("prompts:", *(f"{i}: {p}" for i, p in enumerate(demo)), sep="\n  ")
    print(f"{time.perf_counter() - t0:.1f} s on one thread, template rendering included")
