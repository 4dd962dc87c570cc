# The Carve3D reward: Multi-view Reconstruction Consistency (MRC).
#
# Carve3D (Xie et al., CVPR 2024) Sec. 3, Fig. 2: reconstruct the 4 generated views with a sparse-view
# reconstructor, re-render the reconstruction at the same cameras, and compare each generated view with its
# re-rendering by LPIPS on the object's crop; reward = -MRC. The crop / resize / LPIPS recipe follows the
# released code step by step (desaixie/carve3d rewards.py, compute_mrc_reward); the reconstructor is LGM
# (reconstruct.py) instead of Instant3D's unreleased LRM. stat_tracking.py turns rewards into advantages.
import math
import os

import torch
import torch.nn.functional as F
import torchvision

import reconstruct
from support.lpips_weights import load_lpips

__all__ = ["load_lpips", "crop_boxes", "mrc", "zoom_to_size", "MRCReward"]

# ---------------------------------------------------------------------------------------------------
# 1. MRC between generated views and their re-renderings (rewards.py steps: box, square, pad, crop, LPIPS)

FOREGROUND_THRESHOLD = 0.95  # white background: a pixel is foreground if any channel < 0.95
BOX_PADDING = 5


def crop_boxes(views, threshold=FOREGROUND_THRESHOLD):
    # Foreground box of each generated view, made square, padded and clamped (rewards.py
    # compute_bounding_box, make_square_bbox).
    # views (..., 3, H, W) -> (..., 4) int64 [x_min, y_min, x_max, y_max], inclusive pixel coords.
    height, width = views.shape[-2:]
    fg = (views < threshold).any(dim=-3)
    cols, rows = fg.any(dim=-2), fg.any(dim=-1)
    xs = torch.arange(width, device=views.device)
    ys = torch.arange(height, device=views.device)
    x_min = torch.where(cols, xs, width).amin(-1)
    x_max = torch.where(cols, xs, -1).amax(-1)
    y_min = torch.where(rows, ys, height).amin(-1)
    y_max = torch.where(rows, ys, -1).amax(-1)
    # An all-background view gets the box [0, 0, 0, 0] as in Carve3D; after padding and clamping that
    # is the 6x6 top-left corner, i.e. the reward then compares a blank corner (we follow the reference).
    empty = ~cols.any(-1)
    x_min, y_min, x_max, y_max = (torch.where(empty, 0, c) for c in (x_min, y_min, x_max, y_max))

    # Square it: grow the short side by the difference, the odd extra pixel going to the top/left.
    w, h = x_max - x_min + 1, y_max - y_min + 1
    diff = (w - h).abs()
    after = diff // 2
    before = diff - after
    wide = w > h
    y_min = y_min - torch.where(wide, before, 0)
    y_max = y_max + torch.where(wide, after, 0)
    x_min = x_min - torch.where(wide, 0, before)
    x_max = x_max + torch.where(wide, 0, after)

    # Pad, then clamp to the image. Carve3D clamps both max coords to width-1 (it assumes square
    # images); mrc() insists on H == W so this is the same thing.
    last = width - 1
    box = torch.stack(
        [
            (x_min - BOX_PADDING).clamp(min=0),
            (y_min - BOX_PADDING).clamp(min=0),
            (x_max + BOX_PADDING).clamp(max=last),
            (y_max + BOX_PADDING).clamp(max=last),
        ],
        dim=-1,
    )
    return box


def _check_images(name, x):
    if not torch.is_tensor(x) or x.dim() != 5 or x.shape[2] != 3:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, V, 3, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
    lo, hi = torch.aminmax(x.detach().float())
    lo, hi = lo.item(), hi.item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (images on white), got values in [{lo}, {hi}]")


def mrc(views, renders, lpips_model, size=None, per_view=False, threshold=FOREGROUND_THRESHOLD):
    _check_images("views", views)
    _check_images("renders", renders)
    if views.shape != renders.shape:
        raise ValueError(
            f"renders {tuple(renders.shape)} must have the shape of views {tuple(views.shape)}: the crop box "
            "is found on the view and applied to the render in the same pixel coordinates (Carve3D's rewards.py)"
        )
    batch, num_views, _, height, width = views.shape
    if height != width:
        raise ValueError(f"views must be square (Carve3D clamps both axes to width-1), got H={height}, W={width}")
    size = height if size is None else int(size)  # Carve3D resizes to the render resolution
    if size < 31 and getattr(lpips_model, "pnet_type", None) == "alex":
        raise ValueError(f"size={size}: LPIPS-AlexNet needs crops of at least 31x31 pixels")

    boxes = crop_boxes(views, threshold).tolist()  # one host sync; crop sizes differ per view
    pairs = torch.stack([views, renders], dim=2).float()  # (B, V, 2, 3, H, W)
    # Per-crop loop (B*V interpolate calls): each crop has its own size, and grid_sample has no
    # antialiased bicubic, so this is the way to match Carve3D's resize exactly.
    crops = []
    for b in range(batch):
        for v in range(num_views):
            x0, y0, x1, y1 = boxes[b][v]
            crop = pairs[b, v, :, :, y0 : y1 + 1, x0 : x1 + 1]
            crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    crops = torch.stack(crops).clamp(0.0, 1.0)  # (B*V, 2, 3, S, S); bicubic overshoots, Carve3D clamps

    param = next(lpips_model.parameters())
    crops = crops.to(device=param.device, dtype=param.dtype)
    # One batched LPIPS call; normalize=True maps [0, 1] to lpips' [-1, 1] (torchmetrics' normalize=True).
    dist = lpips_model(crops[:, 0], crops[:, 1], normalize=True).reshape(batch, num_views)
    return dist if per_view else dist.mean(dim=1)


# ---------------------------------------------------------------------------------------------------
# 2. The reward: views -> LGM -> Gaussians -> renders at the same cameras -> MRC (Carve3D Fig. 2)


def _check_views(views):
    if not torch.is_tensor(views) or views.dim() != 5 or tuple(views.shape[1:3]) != (4, 3):
        got = tuple(views.shape) if torch.is_tensor(views) else type(views).__name__
        raise ValueError(f"views must be (B, 4, 3, H, W) in MVDream view order, got {got}")


# ---------------------------------------------------------------------------------------------------
# Beyond Carve3D, off by default (config mrc_object_size; toy.yaml 0.6): MRC at one object size.

def zoom_to_size(views, fraction, threshold=FOREGROUND_THRESHOLD):
    # The 4 views of a sample zoomed by ONE factor about the image centre, so that the object reaches `fraction`
    # of the half-image (its farthest pixel from the centre, mean over the views). Toy objects sit at the cameras'
    # look-at point, so this is the object scaled in 3D: MRC stops paying for small objects, while a view drawn at
    # another size than the others still differs from them after the common zoom. views (B, V, 3, S, S) in [0, 1].
    B, V, C, H, W = views.shape
    fg = (views < threshold).any(dim=2)
    dist = (torch.arange(W, device=views.device, dtype=views.dtype) - (W - 1) / 2).abs()

    def reach(mask):  # (B, V, W) -> (B, V): farthest foreground column (or row) from the centre, in pixels
        return torch.where(mask, dist, torch.zeros_like(dist)).amax(-1) + 0.5
    half = torch.maximum(reach(fg.any(dim=-2)), reach(fg.any(dim=-1))).mean(1)
    zoom = (fraction * W / 2 / half.clamp(min=1.0)).clamp(0.5, 2.0).repeat_interleave(V)
    theta = torch.zeros(B * V, 2, 3, device=views.device, dtype=views.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    grid = F.affine_grid(theta, (B * V, C, H, W), align_corners=False)
    out = F.grid_sample(views.flatten(0, 1) - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + 1).view_as(views).clamp(0, 1)  # outside the image: white


class MRCReward:
    # recenter: LGM's text-to-3D app recentres each generated view on its own before LGM (3DTopia/LGM app.py;
    # reconstruct.recenter_views). Off by default, because Carve3D's reward must see the views as generated:
    # MRC then scores the views and renders in the recentred frame, and per-view recentring forgives exactly
    # the inconsistencies in object size and placement between views that the reward is meant to penalise.
    # fg_threshold: Carve3D's 0.95 finds the object's box on clean white backgrounds; the toy VAE leaves faint
    # speckle (0.8-0.95) on the background of everything it decodes, so there every box would be the whole image and
    # MRC would score the object's share of the image, i.e. its size (toy.yaml: 0.8).
    # object_size > 0: all views zoomed alike to that object size first (zoom_to_size; off in Carve3D).
    def __init__(self, lgm, lpips_model, elevation=0.0, lpips_size=None, recenter=False,
                 fg_threshold=FOREGROUND_THRESHOLD, object_size=0.0):
        self.lgm, self.fg_threshold, self.object_size = lgm, fg_threshold, object_size
        self.lpips_model = lpips_model.float()  # the distance is computed in fp32 (see __call__)
        self.elevation = float(elevation)  # MVDream convention: positive = camera above
        self.lpips_size = lpips_size
        self.recenter = recenter
        # MVDream emits views in its own azimuth order; LGM wants input view k at azimuth 90k
        # (3DTopia/LGM app.py). to_lgm[k] = MVDream view placed in LGM slot k; to_mvdream is its inverse.
        self.to_lgm = list(reconstruct.MVDREAM_TO_LGM)
        self.to_mvdream = [self.to_lgm.index(j) for j in range(len(self.to_lgm))]
        # Slot k's camera = the camera MVDream view to_lgm[k] shows (== standard_cameras(-elevation)).
        self.cameras = reconstruct.mvdream_view_cameras(self.elevation, radius=lgm.config.cam_radius)[self.to_lgm]

    def prepare(self, views):
        # the views the reward sees, on LGM's device: as generated, recentred per view or zoomed alike (above)
        _check_views(views)
        views = views.to(next(self.lgm.parameters()).device).float()
        views = reconstruct.recenter_views(views) if self.recenter else views
        return zoom_to_size(views, self.object_size, self.fg_threshold) if self.object_size else views

    def _lgm(self, views):
        param = next(self.lgm.parameters())
        return self.lgm.reconstruct(views[:, self.to_lgm].to(param.dtype), self.cameras.to(param.device))

    @torch.no_grad()
    def reconstruct(self, views):
        # (B, 4, 3, H, W) views in MVDream order -> (B, N, 14) Gaussians in LGM's world frame: exactly what
        # __call__ renders, so a .ply or an orbit of them (view3d.py) shows the 3D object the reward scored.
        return self._lgm(self.prepare(views))

    @torch.no_grad()
    def __call__(self, views):
        views = self.prepare(views)
        height, width = views.shape[-2:]
        if height != width:
            raise ValueError(f"views must be square (Carve3D's crop box assumes it), got H={height}, W={width}")
        c2w = self.cameras.to(views.device)
        gaussians = self._lgm(views)
        # Render at the *input* resolution (not LGM's output_size): the crop box is found on the view
        # and applied to the render in the same pixel coordinates.
        out = reconstruct.render_gaussians(gaussians.float(), c2w, self.lgm.config.fovy, height, width, background=1.0)
        renders = out["image"][:, self.to_mvdream]

        # crop, resize and LPIPS in fp32, whatever autocast the caller runs under (the distance is the reward)
        with torch.autocast(views.device.type, enabled=False):
            per_view = mrc(views, renders, self.lpips_model, self.lpips_size, True, self.fg_threshold)
        value = per_view.mean(dim=1)
        return {"reward": -value, "mrc": value, "mrc_per_view": per_view, "renders": renders}


# ---------------------------------------------------------------------------------------------------
# 3. Demo: MRC of a random Gaussian scene's renders against a copy with one view shifted


def random_scene(num_gaussians, generator):
    # A blob of coloured Gaussians around the origin, in the (B, N, 14) activated layout of
    # reconstruct.render_gaussians: xyz, opacity, scale, rotation (w,x,y,z), rgb.
    g = generator
    xyz = (torch.rand(num_gaussians, 3, generator=g) - 0.5) * 0.6
    opacity = 0.6 + 0.4 * torch.rand(num_gaussians, 1, generator=g)
    scale = 0.02 + 0.04 * torch.rand(num_gaussians, 3, generator=g)
    rotation = F.normalize(torch.randn(num_gaussians, 4, generator=g), dim=-1)
    rgb = torch.rand(num_gaussians, 3, generator=g)
    return torch.cat([xyz, opacity, scale, rotation, rgb], dim=-1)[None]


def shift_right(image, pixels):
    # Translate by `pixels` to the right, filling with white background.
    if pixels == 0:
        return image.clone()
    out = torch.ones_like(image)
    out[..., pixels:] = image[..., :-pixels]
    return out


if __name__ == "__main__":
    size, fovy = 64, 49.1
    scene = random_scene(512, torch.Generator().manual_seed(0))
    cameras = reconstruct.mvdream_view_cameras(15.0)
    views = reconstruct.render_gaussians(scene, cameras, fovy, size, size)["image"]  # (1, 4, 3, 64, 64)
    model = load_lpips()
    print("MRC of views vs renders where view 2 is shifted right by k pixels:")
    for k in range(6):
        renders = views.clone()
        renders[:, 2] = shift_right(views[:, 2], k)
        per_view = mrc(views, renders, model, per_view=True)
        print(f"  k={k}: MRC={per_view.mean().item():.4f}  per view={[round(v, 4) for v in per_view[0].tolist()]}")

    lgm = reconstruct.LGM("tiny").eval()
    with torch.no_grad():
        lgm.conv.bias[4:7] = -2.0  # random head -> small Gaussians (as a trained LGM); keeps CPU rendering fast
    result = MRCReward(lgm, model, elevation=15.0)(views)
    print(f"tiny random LGM: reward={result['reward'].item():.4f} per view={result['mrc_per_view'][0].tolist()}")
    os.makedirs("outputs", exist_ok=True)
    grid = torch.cat([torch.cat(list(views[0]), dim=-1), torch.cat(list(result["renders"][0]), dim=-1)], dim=-2)
    torchvision.utils.save_image(grid, "outputs/reward_demo.png")
    print("wrote outputs/reward_demo.png (top: views, bottom: tiny-LGM renders)")
