"""Look at the 3D result: the Gaussians that LGM reconstructs from a model's 4 views, i.e. the object the MRC reward
scores (Carve3D Sec. 3, Fig. 2), as a .ply for any 3D Gaussian splatting viewer, an orbit GIF, and a PNG strip that
puts models side by side, before and after RL.

    python view3d.py        # demo: ground truth and sft-base on one toy prompt -> outputs/view3d/ (~15 s, CPU)
    python view3d.py --prompt "a red cube with a blue cone on its left" --rows gt checkpoints/toy/sft-base \\
        checkpoints/toy/sft-base+runs/toy/checkpoints/epoch_0019 --out docs/orbit_strip.png

A row is `gt` (the toy world's ground-truth object, rendered by world.render_views) or CHECKPOINT[+LORA] (sampled with
evaluate.py's fixed-noise rule, sample.sample_fixed_noise, so every model starts from the same noise), optionally
named: NAME=ROW. Each row of the PNG shows the 4 views, then its reconstruction (MRCReward.reconstruct) re-rendered at
the 4 input cameras (what MRC compares with the views) and from 30 degrees higher (cameras LGM never saw).
Next to the PNG: <out>_<k>_<row>.ply and .gif for row k (an orbit: 36 azimuths, then 36 more 30 degrees higher).
"""
import argparse
import os
import re
import time

import torch
from PIL import Image, ImageDraw

from mvdream import MVDreamPolicy
from reconstruct import LGM, orbit_camera, render_gaussians
from reward import MRCReward, load_lpips
from sample import sample_fixed_noise
from support.cli import add_reward_args, add_sampling_args
from support.ply import write_ply
from toy import world

ORBIT_STEPS = 36  # frames per ring, one every 10 degrees of azimuth
RAISE_DEG = 30.0  # the second ring looks from 30 degrees higher: the top of the object, which no input view shows
# MVDream view j looks from azimuth 270 + 90 j of LGM's world (reconstruct.mvdream_view_cameras): starting there,
# frames 0, 9, 18, 27 of a ring at the views' elevation are exactly the 4 input cameras
FIRST_AZIMUTH = 270.0
ORBIT_SIZE = 128  # orbit frames are rendered at 128x128 (twice the toy views: the Gaussians' detail shows)
FRAME_MS = 80  # GIF frame duration: 72 frames = a 5.8 s loop
CAPTION_PX, HEADER_PX, GAP_PX = 12, 26, 8  # strip: caption above each row, prompt + column titles, views | renders
DEMO_PROMPT = "a red cube with a blue cone on its left"

# ------------------------------------------------------------------------------------------------------------------
# Orbit cameras and frames


def orbit_cameras(elevation, steps=ORBIT_STEPS, radius=1.5, raise_deg=RAISE_DEG):
    # (2 * steps, 4, 4) OpenGL camera-to-world, all looking at the origin: a ring at `elevation` (MVDream convention,
    # positive = camera above, hence kiui's orbit_camera(-elevation)), then a ring raise_deg higher. Azimuth grows
    # in the order of MVDream's views, so the orbit passes view 0, 1, 2, 3 in turn.
    rings = (float(elevation), float(elevation) + raise_deg)
    if not all(-90.0 < e < 90.0 for e in rings):
        raise ValueError(f"orbit_cameras: elevations {rings} must lie strictly between -90 and 90 degrees "
                         f"(at the pole the orbit camera has no 'up'); lower --elevation")
    return torch.stack([orbit_camera(-e, FIRST_AZIMUTH + 360.0 * k / steps, radius)
                        for e in rings for k in range(steps)])


@torch.no_grad()
def render_orbit(gaussians, elevation, size=ORBIT_SIZE, fovy=49.1, radius=1.5, views_per_call=8, steps=ORBIT_STEPS):
    """One object's Gaussians (N, 14) -> (2 * steps, 3, size, size) frames on the CPU, on white.

    Rendered `views_per_call` cameras at a time: the renderer's memory grows with cameras x Gaussians (65,536 for
    LGM big), so 72 views in one call would cost 18 times the 4 views of the reward."""
    g = gaussians[None] if gaussians.dim() == 2 else gaussians
    if g.dim() != 3 or g.shape[0] != 1 or g.shape[-1] != 14:
        raise ValueError(f"render_orbit: pass ONE object's Gaussians (N, 14), got {tuple(gaussians.shape)}")
    cams = orbit_cameras(elevation, steps, radius).to(g.device)
    frames = [render_gaussians(g.float(), cams[i:i + views_per_call], fovy, size, size, background=1.0)["image"][0]
              for i in range(0, len(cams), views_per_call)]
    return torch.cat(frames).cpu()


def _picture(image, size):
    # (3, h, w) in [0, 1] -> a size x size PIL image: enlarged with NEAREST (shows the model's real pixels),
    # shrunk with LANCZOS (no aliasing)
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array)
    if picture.size == (size, size):
        return picture
    return picture.resize((size, size), Image.NEAREST if size > picture.width else Image.LANCZOS)


def save_orbit_gif(path, views, frames, ms_per_frame=FRAME_MS):
    """Animated GIF, looping forever: each frame = the 4 input views (MVDream order, 2x2, left) + one orbit frame."""
    size = frames.shape[-1]
    half = size // 2
    inputs = Image.new("RGB", (size, size), "white")
    for j, view in enumerate(views):
        inputs.paste(_picture(view, half), ((j % 2) * half, (j // 2) * half))
    pictures = []
    for frame in frames:
        canvas = Image.new("RGB", (2 * size, size), "white")
        canvas.paste(inputs, (0, 0))
        canvas.paste(_picture(frame, size), (size, 0))
        pictures.append(canvas)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # note: Pillow's GIF writer merges identical consecutive frames (summing their durations)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)
    return path


def strip_frames(frames):
    # 8 of a 2-ring orbit: azimuths of the 4 input views on the first ring, then the same 4 on the raised ring
    if len(frames) < 8 or len(frames) % 8:
        raise ValueError(f"strip_frames: expected a 2-ring orbit of 8k frames (render_orbit), got {len(frames)}")
    return frames[::len(frames) // 8]


def orbit_strip(path, rows, title=""):
    """PNG: one row per model, [(caption, views (4, 3, h, w), orbit frames (F, 3, S, S))], tiles of S x S pixels:
    the 4 views | strip_frames(orbit), under a header with `title` (e.g. the prompt) and the column titles."""
    tile = rows[0][2].shape[-1]
    width = 4 * tile + GAP_PX + 8 * tile
    canvas = Image.new("RGB", (width, HEADER_PX + len(rows) * (CAPTION_PX + tile)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=(0, 0, 0))
    x_renders = 4 * tile + GAP_PX
    for x, text in ((0, "the 4 views as the reward sees them"), (x_renders, "LGM at the input cameras"),
                    (x_renders + 4 * tile, f"LGM, {RAISE_DEG:g} deg higher")):
        draw.text((x + 2, 13), text, fill=(90, 90, 90))
    for r, (caption, views, frames) in enumerate(rows):
        top = HEADER_PX + r * (CAPTION_PX + tile)
        draw.text((2, top), caption, fill=(0, 0, 0))
        for j, view in enumerate(views):
            canvas.paste(_picture(view, tile), (j * tile, top + CAPTION_PX))
        for j, frame in enumerate(strip_frames(frames)):
            canvas.paste(_picture(frame, tile), (x_renders + j * tile, top + CAPTION_PX))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def slug(text, limit=60):
    # a file-name-safe form of a prompt or row name: "a red cube" -> "a_red_cube"
    return re.sub(r"[^a-z0-9.-]+", "_", text.lower()).strip("_")[:limit] or "object"


def export_object(prefix, reward_fn, views, size=ORBIT_SIZE):
    """One object's views (4, 3, H, W), MVDream order -> prefix.ply and prefix.gif of the Gaussians that the MRC
    reward reconstructs from them, orbited at the reward's elevation and LGM's fovy and radius.
    Returns (orbit frames, number of Gaussians in the .ply)."""
    gaussians = reward_fn.reconstruct(views[None])[0]
    cfg = reward_fn.lgm.config
    frames = render_orbit(gaussians, reward_fn.elevation, size, cfg.fovy, cfg.cam_radius)
    written = write_ply(prefix + ".ply", gaussians)
    save_orbit_gif(prefix + ".gif", views, frames)
    return frames, written

# ------------------------------------------------------------------------------------------------------------------
# CLI: the README strip


def parse_row(row):
    # "[NAME=]gt" or "[NAME=]CHECKPOINT[+LORA]" -> (name, checkpoint or None for ground truth, lora or None)
    name, sep, source = row.partition("=")
    if not sep:
        name, source = "", row
    if source == "gt":
        return name or "ground truth", None, None
    checkpoint, _, lora = (source, "", "") if os.path.exists(source) else source.partition("+")
    if not checkpoint or (lora and not os.path.exists(lora)):
        raise ValueError(f"--rows {row!r}: expected gt or CHECKPOINT[+LORA] (LoRA = a train.py checkpoint dir), "
                         f"optionally NAME=...; LoRA path {lora!r} does not exist")
    base = os.path.basename(os.path.normpath(checkpoint))
    return name or (f"{base} + {os.path.basename(os.path.normpath(lora))}" if lora else base), checkpoint, lora or None


def row_views(checkpoint, lora, prompt, args, device):
    # (4, 3, H, W): the ground-truth renders or the first fixed-noise sample of the prompt (evaluate.py's rule)
    if checkpoint is None:
        return world.ground_truth_views([prompt], 1, args.seed, args.elevation, device)[0, 0]
    policy = MVDreamPolicy.from_pretrained(checkpoint).to(device).eval()
    if lora:
        policy.load_lora(lora)
    return sample_fixed_noise(policy, [prompt], 1, seed=args.seed, num_steps=args.num_steps,
                              guidance_scale=args.guidance_scale, eta=args.eta, batch_size=1,
                              cpu_bf16=args.bf16)[0, 0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEMO_PROMPT, help="one prompt for every row")
    p.add_argument("--rows", nargs="+", default=["gt", "checkpoints/toy/sft-base"],
                   help="gt or CHECKPOINT[+LORA], optionally NAME=...; one strip row each")
    p.add_argument("--out", default="outputs/view3d/orbit_strip.png", help="the PNG; .ply and .gif go next to it")
    p.add_argument("--size", type=int, default=ORBIT_SIZE, help="orbit frame (and strip tile) size in pixels")
    add_sampling_args(p)  # evaluate.py's, so a row samples what evaluate.py scores
    add_reward_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [parse_row(row) for row in args.rows]  # a typo fails before any work
    t0 = time.perf_counter()
    lgm = LGM.from_pretrained(args.lgm, config=args.lgm_config).to(device).eval().requires_grad_(False)
    reward_fn = MRCReward(lgm, load_lpips("alex").to(device), elevation=args.elevation,
                          fg_threshold=args.mrc_fg_threshold, object_size=args.mrc_object_size)
    stem = os.path.splitext(args.out)[0]
    strip = []
    for k, (name, checkpoint, lora) in enumerate(rows):
        views = row_views(checkpoint, lora, args.prompt, args, device)
        mrc = reward_fn(views[None])["mrc"].item()
        prefix = f"{stem}_{k}_{slug(name)}"
        frames, written = export_object(prefix, reward_fn, views, args.size)
        print(f"{name}: MRC {mrc:.3f}; {written} Gaussians -> {prefix}.ply, orbit -> {prefix}.gif")
        strip.append((f"{name} | MRC {mrc:.3f}", reward_fn.prepare(views[None])[0].cpu(), frames))
    orbit_strip(args.out, strip, title=args.prompt)
    print(f"wrote {args.out} ({len(rows)} rows) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
