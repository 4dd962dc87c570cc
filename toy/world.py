# toy/world.py — a procedural 3D toy world that makes Carve3D runnable offline on a laptop CPU.
#
# Real MVDream/LGM weights cannot be used here, so we build a small world whose ground truth we can render
# with our own Gaussian renderer (reconstruct.render_gaussians): every object is a set of 3D
# Gaussians in LGM's 14-channel layout (LGM core/models.py) on a white background (as LGM's renders). A tiny MVDream (toy/sft.py)
# learns prompt -> 4 views, a tiny LGM learns 4 views -> Gaussians, and RL then improves the multi-view
# consistency that MRC measures (Carve3D Sec. 3). Parts sit on a side of the main object, so the 4 views
# really differ (a part on the left is on the left in view 0, in front in view 3, hidden in view 1), and a
# model can get one view right and another wrong — exactly the inconsistency MRC is meant to catch.
#
# Sections: constants, prompt grammar and splits, object frame, shapes, make_object, rendering and batches,
# palette colour classes (used by toy/fidelity.py, the prompt-fidelity metric), distort_view (controlled
# inconsistency, Carve3D Sec. 3).
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import reconstruct
from support.seeding import make_generator


@dataclass(frozen=True)
class ToyConfig:
    resolution: int = 64          # images are 64x64 (the tiny MVDream denoises the toy VAE's 4x16x16 latents)
    elevation: float = 15.0       # MVDream convention (camera ABOVE); reconstruct.mvdream_view_cameras converts it
    fovy: float = 49.1            # LGM's field of view (LGM core/options.py)
    radius: float = 1.5           # LGM's camera radius (LGM core/options.py)
    num_views: int = 4
    num_gaussians: int = 1024     # fixed N per object so batches stack (main 768 + part 256 or padding)


TOY = ToyConfig()
N_MAIN, N_PART = 768, 256


# ---------------------------------------------------------------------------------------------------------
# Prompt grammar and compositional split
#
#   prompt := "a" COLOR SHAPE                                              (single object)
#           | "a" COLOR SHAPE "with" "a" COLOR SHAPE "on" "its" SIDE       (main object + one part)
#   COLOR  := red | yellow | green | blue | purple      (hues ~0, 51, 126, 227, 282 deg: well separated)
#   SHAPE  := cube | ball | cone | cylinder
#   SIDE   := left | right | front | back | top
# Constraint: the part's colour differs from the main colour (otherwise the part is invisible to colour-
# based checks and to a viewer at 64 px).
#
# Split rule (compositional generalisation): a prompt belongs to the TEST split iff it contains a held-out
# combination, otherwise to TRAIN:
#   * a held-out (colour, shape) pair, for the main object or the part (e.g. "yellow cube" never appears in
#     train, neither as main object nor as part), or
#   * a held-out (part shape, side) pair (e.g. a ball is never on the left in train).
# Every word and every other pairing still occurs in train, so the test prompts are new compositions of
# known words. The splits are therefore disjoint and together cover the whole grammar: 20 single-object and
# 1600 two-object prompts, 1179 in train and 441 in test.
# ---------------------------------------------------------------------------------------------------------
PALETTE = {  # base RGB; hue is what toy/fidelity.py reads, so hues are kept >= 50 degrees apart
    "red": (0.85, 0.10, 0.10),
    "yellow": (0.95, 0.82, 0.08),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.12, 0.28, 0.88),
    "purple": (0.58, 0.12, 0.78),
}
COLORS = tuple(PALETTE)
SHAPES = ("cube", "ball", "cone", "cylinder")
SIDES = ("left", "right", "front", "back", "top")
FUNCTION_WORDS = ("a", "with", "on", "its")
VOCAB = list(FUNCTION_WORDS + COLORS + SHAPES + SIDES)

HELD_OUT_COLOR_SHAPE = (("yellow", "cube"), ("blue", "cone"))
HELD_OUT_PART_SIDE = (("ball", "left"), ("cube", "top"))


class ToyPrompt(NamedTuple):
    color: str
    shape: str
    part_color: str | None = None
    part_shape: str | None = None
    side: str | None = None

    @property
    def has_part(self) -> bool:
        return self.part_color is not None


def format_prompt(p: ToyPrompt) -> str:
    text = f"a {p.color} {p.shape}"
    if p.has_part:
        text += f" with a {p.part_color} {p.part_shape} on its {p.side}"
    return text


_GRAMMAR = ('"a COLOR SHAPE" or "a COLOR SHAPE with a COLOR SHAPE on its SIDE" with COLOR in '
            f"{list(COLORS)}, SHAPE in {list(SHAPES)}, SIDE in {list(SIDES)} (part colour != main colour)")


def parse_prompt(prompt: str) -> ToyPrompt:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.split()

    def check(word, allowed, role):
        if word not in allowed:
            raise ValueError(f"prompt {prompt!r}: {word!r} is not a valid {role}; expected one of {list(allowed)}. "
                             f"Toy grammar: {_GRAMMAR}")
        return word

    if len(words) not in (3, 10):
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy grammar has prompts of 3 or 10 words: "
                         f"{_GRAMMAR}")
    check(words[0], ("a",), "first word")
    color, shape = check(words[1], COLORS, "colour"), check(words[2], SHAPES, "shape")
    if len(words) == 3:
        return ToyPrompt(color, shape)
    for i, w in ((3, "with"), (4, "a"), (7, "on"), (8, "its")):
        check(words[i], (w,), f"word {i}")
    part = ToyPrompt(color, shape, check(words[5], COLORS, "part colour"), check(words[6], SHAPES, "part shape"),
                     check(words[9], SIDES, "side"))
    if part.part_color == color:
        raise ValueError(f"prompt {prompt!r}: the part colour must differ from the main colour ({color!r}); "
                         f"pick another part colour from {list(COLORS)}")
    return part


def _all_prompts() -> list[ToyPrompt]:
    out = [ToyPrompt(c, s) for c, s in itertools.product(COLORS, SHAPES)]
    for c, s, pc, ps, side in itertools.product(COLORS, SHAPES, COLORS, SHAPES, SIDES):
        if pc != c:
            out.append(ToyPrompt(c, s, pc, ps, side))
    return out


def held_out_combinations(p: ToyPrompt) -> list[tuple[str, str]]:
    found = [cs for cs in ((p.color, p.shape), (p.part_color, p.part_shape)) if cs in HELD_OUT_COLOR_SHAPE]
    if (p.part_shape, p.side) in HELD_OUT_PART_SIDE:
        found.append((p.part_shape, p.side))
    return found


def train_prompts() -> list[str]:
    return [format_prompt(p) for p in _all_prompts() if not held_out_combinations(p)]


def test_prompts() -> list[str]:
    return [format_prompt(p) for p in _all_prompts() if held_out_combinations(p)]


# ---------------------------------------------------------------------------------------------------------
# Object frame. World = LGM/kiui OpenGL frame, y up (kiui/cam.py). Sides are defined relative to MVDream view 0,
# whose camera is reconstruct.mvdream_view_cameras(e)[0] = orbit_camera(-e, azimuth 270): it sits on the -x
# axis looking towards +x, its image-right axis is +z. So:
#   front = towards view 0's camera (-x), back = +x, left = image-left of view 0 (-z), right = +z, top = +y.
# MVDream view j looks from azimuth 90*((j-1) % 4): view 1 from +z (sees the "right" part in front, the "left"
# part hidden), view 2 from +x (sees the back, left/right swapped in the image), view 3 from -z.
# The random yaw below is at most 25 degrees, too small to move a part to another side (45 would).
# ---------------------------------------------------------------------------------------------------------
SIDE_DIRECTIONS = {
    "front": (-1.0, 0.0, 0.0),
    "back": (1.0, 0.0, 0.0),
    "left": (0.0, 0.0, -1.0),
    "right": (0.0, 0.0, 1.0),
    "top": (0.0, 1.0, 0.0),
}
MAX_YAW_DEG = 15.0
LIGHT = torch.nn.functional.normalize(torch.tensor([-0.4, 1.0, -0.5]), dim=0)  # from above, front-left (world)

# ---------------------------------------------------------------------------------------------------------
# Shapes: unit shapes of half-height 1 (y in [-1, 1], resting on y = -1), covered by flat Gaussian discs on
# their surface. Each surface patch maps (u, v) in [0,1]^2 to a point and an outward normal with an
# area-preserving parametrisation, so a well-spread 2D point set gives evenly spaced discs.
# ---------------------------------------------------------------------------------------------------------
CYLINDER_RADIUS = 0.8
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _cube_face(axis, sign):
    def f(u, v, inset):
        a, b = (2 * u - 1) * (1 - inset), (2 * v - 1) * (1 - inset)
        cols = [a, b]
        cols.insert(axis, torch.full_like(u, sign))
        p = torch.stack(cols, -1)
        n = torch.zeros_like(p)
        n[:, axis] = sign
        return p, n
    return f


def _sphere(u, v, inset):
    y = 1 - 2 * u                                   # Archimedes: uniform in height = uniform in area
    r, th = (1 - y * y).clamp(min=0).sqrt(), 2 * math.pi * v
    p = torch.stack([r * th.sin(), y, r * th.cos()], -1)
    return p, p.clone()


def _disk(y, radius, normal_y):
    def f(u, v, inset):
        r, th = (radius - inset) * u.sqrt(), 2 * math.pi * v
        p = torch.stack([r * th.sin(), torch.full_like(u, y), r * th.cos()], -1)
        n = torch.zeros_like(p)
        n[:, 1] = normal_y
        return p, n
    return f


def _cone_side(u, v, inset):
    s, th = u.sqrt() * (1 - 0.5 * inset), 2 * math.pi * v   # s = fraction of the way from the apex to the rim
    p = torch.stack([s * th.sin(), 1 - 2 * s, s * th.cos()], -1)
    n = torch.nn.functional.normalize(torch.stack([th.sin(), torch.full_like(u, 0.5), th.cos()], -1), dim=-1)
    return p, n


def _cylinder_side(u, v, inset):
    th = 2 * math.pi * v
    n = torch.stack([th.sin(), torch.zeros_like(u), th.cos()], -1)
    p = n * CYLINDER_RADIUS
    p[:, 1] = (2 * u - 1) * (1 - inset)
    return p, n


_R = CYLINDER_RADIUS
SHAPE_PATCHES = {  # shape -> [(area of the unit shape's patch, patch function)]
    "cube": [(4.0, _cube_face(a, s)) for a in range(3) for s in (-1.0, 1.0)],
    "ball": [(4 * math.pi, _sphere)],
    "cone": [(math.pi * math.sqrt(5.0), _cone_side), (math.pi, _disk(-1.0, 1.0, -1.0))],
    "cylinder": [(4 * math.pi * _R, _cylinder_side), (math.pi * _R**2, _disk(1.0, _R, 1.0)),
                 (math.pi * _R**2, _disk(-1.0, _R, -1.0))],
}
SHAPE_REACH = {"cube": 1.0, "ball": 1.0, "cone": 1.0, "cylinder": CYLINDER_RADIUS}  # horizontal half-width


def _split_counts(n, weights):
    # largest-remainder allocation: exact total, deterministic
    w = torch.tensor(weights, dtype=torch.float64)
    raw = n * w / w.sum()
    counts = raw.floor().long()
    order = torch.argsort(-(raw - counts), stable=True)
    counts[order[: n - int(counts.sum())]] += 1
    return counts.tolist()


def _surface_points(shape, n, inset, generator):
    # golden-ratio (Fibonacci) lattice per patch, randomly offset and slightly jittered per object; cube faces
    # use a square grid instead (flat faces show every hole of a lattice), so a cube may return fewer than n
    # points (make_object pads)
    pts, nrm = [], []
    patches = SHAPE_PATCHES[shape]
    for (_, fn), k in zip(patches, _split_counts(n, [a for a, _ in patches])):
        if shape == "cube":
            m = math.isqrt(k)
            i = (torch.arange(m, dtype=torch.float32) + 0.5) / m
            u, v = (x.flatten() for x in torch.meshgrid(i, i, indexing="ij"))
            u, v = (x + (torch.rand(m * m, generator=generator) - 0.5) * (0.1 / m) for x in (u, v))
        else:
            i = torch.arange(k, dtype=torch.float32) + 0.5
            jitter = (torch.rand(2, k, generator=generator) - 0.5) * (0.4 / math.sqrt(k))
            u = (i / k + jitter[0]).clamp(0.0, 1.0)
            v = (i * _GOLDEN + torch.rand(1, generator=generator) + jitter[1]) % 1.0
        p, nn_ = fn(u, v, inset)
        pts.append(p)
        nrm.append(nn_)
    return torch.cat(pts), torch.cat(nrm)


def _uniform(generator, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _disc_quaternion(normal):
    # rotation (w, x, y, z) taking the disc's local z axis to the normal: q = normalise(1 + z.n, z x n)
    w = 1 + normal[:, 2]
    q = torch.stack([w, -normal[:, 1], normal[:, 0], torch.zeros_like(w)], -1)
    flipped = w < 1e-6                              # normal = -z: half turn about x
    q[flipped] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    return torch.nn.functional.normalize(q, dim=-1)


DISC_WIDTH, DISC_THICKNESS = 0.55, 0.15  # disc std-devs in units of the point spacing
OPACITY = 0.98                           # nearly opaque discs: faces must hide what is behind them


def _shape_gaussians(shape, n, half_size, center, rgb, generator):
    # flat discs on the surface, wide enough to overlap their neighbours so the surface is opaque; disc
    # centres stay inside patch borders (cube edges, cylinder rims), else those edges look furry
    area = sum(a for a, _ in SHAPE_PATCHES[shape])
    n_used = 6 * math.isqrt(n // 6) ** 2 if shape == "cube" else n
    spacing = math.sqrt(area / n_used)                                       # in unit-shape coordinates
    p, normal = _surface_points(shape, n, 0.5 * DISC_WIDTH * spacing, generator)
    sigma = spacing * half_size
    scale = torch.tensor([DISC_WIDTH * sigma, DISC_WIDTH * sigma, DISC_THICKNESS * sigma]).expand(len(p), 3)
    return p * half_size + torch.tensor(center), normal, scale, rgb.expand(len(p), 3)


# ---------------------------------------------------------------------------------------------------------
# make_object: prompt -> (N, 14) Gaussians [xyz, opacity, scale(3), rotation (w,x,y,z), rgb], activated values.
# Random per object (all from `generator`): main/part size, part gap and sideways offset, shade of each colour,
# yaw (<= 25 deg), lattice offsets. Shading from a fixed world light is baked into the colours (the renderer
# has no lighting), so the 3D shape reads in the images and stays consistent across views. The object is
# centred on its bounding box (like LGM's recentring in app.py) and fits in [-0.49, 0.49]^3.
# ---------------------------------------------------------------------------------------------------------
# Instance variation of an object (all drawn per object): sizes, shade, yaw, the part's gap and slide. Wide
# enough that views of two instances of one prompt visibly disagree (sizes differ by up to 60%), which is what
# the SFT data's independent-view examples need (toy/sft.py), while every instance still matches its prompt.
MAIN_HALF_SIZE, PART_HALF_SIZE, PART_GAP, PART_SLIDE = (0.20, 0.32), (0.11, 0.14), (0.0, 0.04), 0.3
SHADE = 0.15  # brightness factor in [1 - SHADE, 1 + SHADE]; keeps the hue, so the colour word stays true


def _jittered_color(name, generator):
    base = torch.tensor(PALETTE[name])
    brightness = 1.0 + (2 * torch.rand((), generator=generator).item() - 1.0) * SHADE
    return (base * brightness + (torch.rand(3, generator=generator) - 0.5) * 0.04).clamp(0.0, 1.0)


def make_object(prompt: str, generator: torch.Generator) -> torch.Tensor:
    p = parse_prompt(prompt)
    h = _uniform(generator, *MAIN_HALF_SIZE)                  # main half-size
    main_rgb = _jittered_color(p.color, generator)
    parts = [_shape_gaussians(p.shape, N_MAIN, h, (0.0, 0.0, 0.0), main_rgb, generator)]
    if p.has_part:
        s = _uniform(generator, *PART_HALF_SIZE)              # part half-size
        gap = _uniform(generator, *PART_GAP)
        slide = _uniform(generator, -PART_SLIDE, PART_SLIDE) * s  # along the side, never onto another side
        d = torch.tensor(SIDE_DIRECTIONS[p.side])
        if p.side == "top":                                   # rests on the top (cone: on its apex)
            center = d * (h + s + 0.5 * gap)
        else:                                                 # stands on the ground (y = -h) beside the main
            along = torch.tensor([-d[2].item(), 0.0, d[0].item()])  # horizontal, perpendicular to the side
            center = d * (h * SHAPE_REACH[p.shape] + s * SHAPE_REACH[p.part_shape] + gap) + along * slide
            center[1] = -h + s
        part_rgb = _jittered_color(p.part_color, generator)
        parts.append(_shape_gaussians(p.part_shape, N_PART, s, tuple(center.tolist()), part_rgb, generator))
    xyz, normal, scale, rgb = (torch.cat(x) for x in zip(*parts))

    yaw = math.radians(_uniform(generator, -MAX_YAW_DEG, MAX_YAW_DEG))
    c, sn = math.cos(yaw), math.sin(yaw)
    rot = torch.tensor([[c, 0.0, sn], [0.0, 1.0, 0.0], [-sn, 0.0, c]])
    xyz, normal = xyz @ rot.T, normal @ rot.T
    lo, hi = xyz.min(0).values, xyz.max(0).values
    xyz = xyz - (lo + hi) / 2

    shade = 0.55 + 0.45 * (normal @ LIGHT).clamp(min=0.0)     # ambient + Lambert, baked
    n = xyz.shape[0]
    g = torch.cat([xyz, torch.full((n, 1), OPACITY), scale, _disc_quaternion(normal), rgb * shade[:, None]], -1)
    pad = torch.zeros(TOY.num_gaussians - n, 14)              # invisible padding: opacity 0, white, tiny
    pad[:, 4:7], pad[:, 7], pad[:, 11:] = 0.01, 1.0, 1.0
    return torch.cat([g, pad]).float().contiguous()


def scale_object(gaussians: torch.Tensor, factor) -> torch.Tensor:
    # The same object f times larger about the origin (make_object centres objects there): positions and Gaussian
    # scales times f; opacity, rotation and colour kept. What the robustness experiment, evaluate.py's size
    # reference and the LGM's scale augmentation (toy/sft.py) feed the reward. factor: a number, or one per
    # object (B,) for gaussians (B, N, 14).
    f = torch.as_tensor(factor, dtype=gaussians.dtype, device=gaussians.device)
    f = f.view(-1, *([1] * (gaussians.dim() - 1))) if f.dim() else f
    out = gaussians.clone()
    out[..., 0:3] = gaussians[..., 0:3] * f
    out[..., 4:7] = gaussians[..., 4:7] * f
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering and training batches
# ---------------------------------------------------------------------------------------------------------
def render_views(gaussians: torch.Tensor, elevation: float = TOY.elevation,
                 resolution: int = TOY.resolution) -> torch.Tensor:
    if gaussians.dim() != 3 or gaussians.shape[-1] != 14:
        raise ValueError(f"gaussians must be (B, N, 14), got {tuple(gaussians.shape)}")
    cams = reconstruct.mvdream_view_cameras(elevation, TOY.radius).to(gaussians.device)
    return reconstruct.render_gaussians(gaussians, cams, TOY.fovy, resolution, resolution)["image"]


def ground_truth_views(prompts: list[str], num_samples: int, seed: int, elevation: float = TOY.elevation,
                       device="cpu", scale: float = 1.0) -> torch.Tensor:
    # The toy world's "ground-truth model" for evaluate.py and view3d.py: (P, S, 4, 3, H, W) renders, object s of
    # prompt i drawn from generator (seed, "object", i, s) on the CPU (the same objects on any device); scale != 1:
    # the same objects scaled in 3D (scale_object)
    objs = torch.stack([scale_object(make_object(p, make_generator("cpu", seed, "object", i, s)), scale)
                        for i, p in enumerate(prompts) for s in range(num_samples)]).to(device)
    views = torch.cat([render_views(objs[i:i + 64], elevation) for i in range(0, len(objs), 64)])  # bounded memory
    return views.view(len(prompts), num_samples, *views.shape[1:])


def vae_roundtrip(vae, views: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    # (..., 3, H, W) in [0, 1] -> encode (posterior mean, as toy/sft.py makes its latents) -> decode -> [0, 1]:
    # views as a latent model (the toy VAE, a diffusers AutoencoderKL) can draw them
    x = views.flatten(0, -4) * 2 - 1
    out = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(chunk)])
    return (out / 2 + 0.5).clamp(0, 1).reshape(views.shape)


def random_cameras(n: int, generator: torch.Generator, elevation_range=(-10.0, 40.0),
                   radius: float = TOY.radius) -> torch.Tensor:
    # extra supervision views for the tiny LGM (LGM trains on 8 views, 4 of them inputs: core/options.py num_views):
    # azimuth uniform in [0, 360), elevation uniform in elevation_range (MVDream convention, positive = above)
    az = torch.rand(n, generator=generator) * 360.0
    el = elevation_range[0] + (elevation_range[1] - elevation_range[0]) * torch.rand(n, generator=generator)
    if n == 0:
        return torch.zeros(0, 4, 4)
    return torch.stack([reconstruct.orbit_camera(-e, a, radius) for e, a in zip(el.tolist(), az.tolist())])


def make_batch(prompts: list[str], generator: torch.Generator, extra_views: int = 4,
               elevation: float = TOY.elevation, resolution: int = TOY.resolution, device="cpu") -> dict:
    # objects and cameras are drawn on the CPU from `generator` (a CPU generator, so a seed gives the same
    # batch on any machine), then rendered on `device`
    gaussians = torch.stack([make_object(p, generator) for p in prompts]).to(device)
    views = render_views(gaussians, elevation, resolution)
    extra_c2w = torch.stack([random_cameras(extra_views, generator) for _ in prompts]).to(device)  # (B, E, 4, 4)
    if extra_views > 0:
        extra = reconstruct.render_gaussians(gaussians, extra_c2w, TOY.fovy, resolution, resolution)["image"]
    else:
        extra = views.new_zeros(len(prompts), 0, 3, resolution, resolution)
    return {
        "prompts": list(prompts),
        "gaussians": gaussians,                                   # (B, N, 14)
        "views": views,                                           # (B, 4, 3, H, W), MVDream order
        "lgm_views": views[:, list(reconstruct.MVDREAM_TO_LGM)],  # (B, 4, 3, H, W), LGM input order (LGM app.py)
        "lgm_cameras": reconstruct.standard_cameras(-elevation, TOY.radius).to(device),  # (4, 4, 4) of lgm_views
        "extra_views": extra,                                     # (B, E, 3, H, W)
        "extra_c2w": extra_c2w,                                   # (B, E, 4, 4)
    }


# ---------------------------------------------------------------------------------------------------------
# Palette colour classes of image pixels: what toy/fidelity.py (the prompt-fidelity metric) segments views with,
# and what distort_view's recolor / blob pick their colours with.
#   foreground = pixels with any channel < 0.95 (the background is white); each foreground pixel is classified
#   by HUE into the 5 palette colours (nearest palette hue within 25 deg, chroma max-min >= 0.12) or "other".
#   Hue ignores the baked shading and the white blending at edges.
# ---------------------------------------------------------------------------------------------------------
FOREGROUND_MAX = 0.95
HUE_TOLERANCE = 25.0
MIN_CHROMA = 0.12


def _hue_chroma(rgb):
    # rgb (..., 3) -> hue in degrees [0, 360), chroma = max - min
    r, g, b = rgb.unbind(-1)
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    c = mx - mn
    safe = c.clamp(min=1e-8)
    hue = torch.where(mx == r, ((g - b) / safe) % 6.0,
                      torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    return hue % 360.0, c


PALETTE_HUES = _hue_chroma(torch.tensor(list(PALETTE.values())))[0]


def palette_classes(images: torch.Tensor) -> torch.Tensor:
    # images (..., 3, H, W) -> (..., H, W) long: -1 background, 0..4 palette colour, 5 "other" foreground
    rgb = images.movedim(-3, -1).float()
    hue, chroma = _hue_chroma(rgb)
    diff = (hue[..., None] - PALETTE_HUES.to(hue.device)).abs()
    diff = torch.minimum(diff, 360.0 - diff)
    dist, idx = diff.min(-1)
    cls = torch.where((chroma >= MIN_CHROMA) & (dist <= HUE_TOLERANCE), idx, torch.full_like(idx, len(COLORS)))
    return torch.where(rgb.min(-1).values < FOREGROUND_MAX, cls, torch.full_like(idx, -1))


def palette_histogram(images: torch.Tensor) -> torch.Tensor:
    # images (..., 3, H, W) -> (..., 2, 6) foreground pixel counts per [image half (left, right), class]
    cls = palette_classes(images)
    onehot = torch.nn.functional.one_hot(cls.clamp(min=0), len(COLORS) + 1) * (cls >= 0)[..., None]
    w = cls.shape[-1]
    return torch.stack([onehot[..., : w // 2, :].sum((-3, -2)), onehot[..., w - w // 2:, :].sum((-3, -2))], -2).float()


# ---------------------------------------------------------------------------------------------------------
# Controlled inconsistency (Carve3D Sec. 3: MRC is validated "under controlled inconsistency levels"; our
# own protocol, since the paper's exact distortions are not public). Distort ONE view of a consistent set and
# MRC should grow with the level. Level 0 is the identity for every kind; the generator only picks
# directions / locations / colours, and draws the same numbers at every level, so for a fixed seed the
# distortion grows monotonically with the level:
#   shift:   translate the content by 2 * `level` pixels in a random direction, white fill
#   rotate:  rotate about the image centre by 5*level degrees (random sign), white fill
#   recolor: rotate the hue of the least frequent palette colour in the view (the part, or the whole object
#            when there is no part) by 20*level degrees (random sign), capped at 180 degrees
#   blob:    paste a disc of a palette colour absent from the view, radius 2 * `level` pixels, centred on a
#            random foreground pixel
# ---------------------------------------------------------------------------------------------------------
DISTORTIONS = ("shift", "rotate", "recolor", "blob")
ROTATE_DEG_PER_LEVEL = 5.0
RECOLOR_DEG_PER_LEVEL = 20.0
BLOB_PX_PER_LEVEL = 2.0
SHIFT_PX_PER_LEVEL = 2.0


def _translate(view, dx, dy):
    c, h, w = view.shape
    out = torch.ones_like(view)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if abs(dx) < w and abs(dy) < h:
        out[:, yd, xd] = view[:, ys, xs]
    return out


def distort_view(view: torch.Tensor, kind: str, level: float, generator: torch.Generator) -> torch.Tensor:
    if kind not in DISTORTIONS:
        raise ValueError(f"kind={kind!r} is not a distortion; choose one of {list(DISTORTIONS)}")
    if view.dim() != 3 or view.shape[0] != 3:
        raise ValueError(f"view must be one image (3, H, W), got {tuple(view.shape)}")
    if level < 0:
        raise ValueError(f"level must be >= 0 (0 = identity), got {level}")
    u = torch.rand(3, generator=generator).tolist()         # same draws at every level (monotone in level)
    sign = 1.0 if u[0] < 0.5 else -1.0
    if level == 0:
        return view.clone()
    if kind == "shift":
        angle = 2 * math.pi * u[1]
        # 2 px per level: a 1-px shift is within the tiny LGM's own reconstruction jitter (it raised MRC for only
        # ~2/3 of objects), so level 1 would not be a controlled inconsistency
        d = SHIFT_PX_PER_LEVEL * level
        return _translate(view, round(d * math.cos(angle)), round(d * math.sin(angle)))
    if kind == "rotate":
        # nearest neighbour: bilinear resampling would also blur the view, and a blurred view is closer to a
        # reconstruction's (smooth) render, which lowers MRC at small angles and breaks monotonicity
        return TF.rotate(view, sign * ROTATE_DEG_PER_LEVEL * level, interpolation=TF.InterpolationMode.NEAREST,
                         fill=[1.0, 1.0, 1.0])
    cls = palette_classes(view)
    counts = palette_histogram(view).sum(0)[: len(COLORS)]
    if kind == "recolor":
        present = (counts >= 4).nonzero()[:, 0]
        if len(present) == 0:
            return view.clone()
        target = present[counts[present].argmin()]
        shift_deg = min(RECOLOR_DEG_PER_LEVEL * level, 180.0) * sign
        shifted = TF.adjust_hue(view.clamp(0, 1), shift_deg / 360.0)
        return torch.where(cls == target, shifted, view)
    # blob
    absent = (counts < 4).nonzero()[:, 0].tolist() or list(range(len(COLORS)))
    rgb = torch.tensor(PALETTE[COLORS[absent[int(u[1] * len(absent))]]], dtype=view.dtype, device=view.device)
    fg = (cls >= 0).flatten().nonzero()[:, 0]
    h, w = view.shape[1:]
    pix = fg[int(u[2] * len(fg))].item() if len(fg) else (h // 2) * w + w // 2
    cy, cx = divmod(pix, w)
    yy, xx = torch.meshgrid(torch.arange(h, device=view.device), torch.arange(w, device=view.device), indexing="ij")
    dist = ((yy - cy) ** 2 + (xx - cx) ** 2).to(view.dtype).sqrt()
    radius = BLOB_PX_PER_LEVEL * level
    cover = (radius + 0.5 - dist).clamp(0.0, 1.0)            # anti-aliased disc of radius 2 * level px
    return view * (1 - cover) + rgb[:, None, None] * cover


# ---------------------------------------------------------------------------------------------------------
# Demo: python -m toy.world -> outputs/toy_demo.png (4 MVDream views per row, prompt above each row)
# ---------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    train, test = train_prompts(), test_prompts()
    print(f"vocab {len(VOCAB)} words; train {len(train)} prompts, test {len(test)} prompts")
    pick = [train[0], train[len(train) // 3], train[2 * len(train) // 3], train[-1],
            test[0], test[len(test) // 3], test[2 * len(test) // 3], test[-1]]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    batch = make_batch(pick, gen, extra_views=0)
    print(f"made + rendered {len(pick)} objects x 4 views in {time.perf_counter() - t0:.2f} s")
    scale, label = 2, 14
    s = TOY.resolution * scale
    canvas = Image.new("RGB", (4 * s, len(pick) * (s + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (prompt, views) in enumerate(zip(pick, batch["views"])):
        y = i * (s + label)
        split = "train" if i < 4 else "test"
        draw.text((2, y + 1), f"[{split}] {prompt}", fill="black")
        for j, v in enumerate(views):
            img = Image.fromarray((v.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            canvas.paste(img.resize((s, s), Image.NEAREST), (j * s, y + label))
    os.makedirs("outputs", exist_ok=True)
    canvas.save("outputs/toy_demo.png")
    print("wrote outputs/toy_demo.png (columns = MVDream views 0..3)")
