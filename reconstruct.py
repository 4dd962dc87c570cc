# Reconstruction half of the Carve3D reward (Carve3D Sec. 3): LGM (Tang et al. 2024, arXiv 2402.05054) turns the
# 4 generated views into 3D Gaussians, which are rendered back at the same cameras.
#
#   cameras + Plücker rays  <- kiui's orbit cameras (ashawkey/kiuikit kiui/cam.py), LGM's rays (3DTopia/LGM
#                              core/utils.py get_rays, core/models.py prepare_default_rays)
#   asymmetric U-Net + head <- 3DTopia/LGM core/unet.py and core/models.py, with the same module names so that
#                              LGM's released checkpoint loads strictly
#   renderer                <- support/rasterizer.py (Inria's 3DGS forward pass in PyTorch)
# The math is adapted from those files; the code is our own. Checkpoint files: support/lgm_weights.py.
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from support import lgm_weights
from support.rasterizer import render_gaussians

__all__ = ["orbit_camera", "standard_cameras", "mvdream_view_cameras", "MVDREAM_TO_LGM", "recenter_views",
           "plucker_rays", "render_gaussians", "LGMConfig", "LGM_CONFIGS", "LGM"]

# ------------------------------------------------------------------------------------------------------
# Cameras (kiui/cam.py orbit_camera, LGM core/utils.py get_rays). OpenGL camera-to-world: columns
# [right, up, forward], the camera looks along -forward.
# ------------------------------------------------------------------------------------------------------


def _safe_normalize(v):
    # kiui's safe_normalize: divide by sqrt(max(|v|^2, 1e-20)) so a zero vector stays finite (kiui/op.py)
    return v / torch.sqrt(torch.clamp((v * v).sum(-1, keepdim=True), min=1e-20))


def orbit_camera(elevation_deg, azimuth_deg, radius=1.5):
    # kiui sign convention: the camera sits at y = -r sin(e), so a POSITIVE elevation puts it BELOW the object
    e, a = math.radians(float(elevation_deg)), math.radians(float(azimuth_deg))
    pos = torch.tensor([radius * math.cos(e) * math.sin(a), -radius * math.sin(e), radius * math.cos(e) * math.cos(a)],
                       dtype=torch.float64)
    forward = _safe_normalize(pos)  # points away from the target (origin)
    right = _safe_normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), forward))
    up = _safe_normalize(torch.linalg.cross(forward, right))
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = torch.stack([right, up, forward], dim=1)
    c2w[:3, 3] = pos
    return c2w.float()


def standard_cameras(elevation_deg=0.0, radius=1.5):
    # LGM's default input poses, in its input order: azimuth 0, 90, 180, 270 (LGM core/models.py prepare_default_rays)
    return torch.stack([orbit_camera(elevation_deg, az, radius) for az in (0, 90, 180, 270)])


# LGM input view k <- MVDream view MVDREAM_TO_LGM[k]: an empirical 90 degree azimuth offset
# (3DTopia/LGM app.py reorders MVDream's output to [1, 2, 3, 0] before LGM)
MVDREAM_TO_LGM = (1, 2, 3, 0)


def mvdream_view_cameras(elevation_deg=0.0, radius=1.5):
    # MVDream view j shows azimuth 90*(j-1) of LGM's world; MVDream's elevation is positive ABOVE, kiui's BELOW
    return torch.stack([orbit_camera(-elevation_deg, 90.0 * ((j - 1) % 4), radius) for j in range(4)])


def recenter_views(views, border_ratio=0.2, threshold=0.95):
    # LGM's text-to-3D input step (3DTopia/LGM app.py, kiui/op.py recenter): per view, crop the object's box
    # (mask: any channel < threshold on the white background, instead of app.py's rembg cut-out), resize it so
    # its longer side is (1 - border_ratio) of the image, and centre it on white. views (B, V, 3, S, S).
    S = views.shape[-1]
    out = torch.ones_like(views)
    fg = (views < threshold).any(dim=-3)
    for b, v in zip(*torch.nonzero(fg.any(-1).any(-1), as_tuple=True)):
        ys, xs = torch.nonzero(fg[b, v], as_tuple=True)
        y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        scale = int(S * (1 - border_ratio)) / max(y1 - y0, x1 - x0)
        h2, w2 = max(1, int((y1 - y0) * scale)), max(1, int((x1 - x0) * scale))
        crop = F.interpolate(views[b, v, None, :, y0:y1, x0:x1], size=(h2, w2), mode="bilinear", antialias=True)
        top, left = (S - h2) // 2, (S - w2) // 2
        out[b, v, :, top:top + h2, left:left + w2] = crop[0].clamp(0, 1)
    empty = ~fg.flatten(-2).any(-1)  # a blank view stays as it is
    out[empty] = views[empty]
    return out


def plucker_rays(c2w, fovy_deg, height, width):
    # Per-pixel ray (o, d) of an OpenGL pinhole with square pixels, embedded as [o x d, d] (LGM core/models.py).
    c2w = torch.as_tensor(c2w)
    if c2w.dim() != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"plucker_rays: c2w must have shape (V, 4, 4), got {tuple(c2w.shape)}")
    if not c2w.is_floating_point():
        c2w = c2w.float()
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):  # geometry stays fp32
        return _plucker_rays(c2w, fovy_deg, height, width)


def _plucker_rays(c2w, fovy_deg, height, width):
    dev, dt = c2w.device, c2w.dtype
    focal = 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
    y, x = torch.meshgrid(torch.arange(height, device=dev, dtype=dt), torch.arange(width, device=dev, dtype=dt),
                          indexing="ij")
    # half-pixel offset, image y flipped because the OpenGL camera's y axis points up
    dirs = torch.stack([(x - 0.5 * width + 0.5) / focal, -(y - 0.5 * height + 0.5) / focal, -torch.ones_like(x)], -1)
    d = _safe_normalize(torch.einsum("hwj,vij->vhwi", dirs, c2w[:, :3, :3]))
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1).permute(0, 3, 1, 2).contiguous()

# ------------------------------------------------------------------------------------------------------
# LGM: asymmetric multi-view U-Net -> 14 Gaussian channels per output pixel (LGM core/unet.py, core/models.py).
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LGMConfig:
    name: str
    input_size: int
    down_channels: tuple
    down_attention: tuple
    mid_attention: bool
    up_channels: tuple
    up_attention: tuple
    splat_size: int  # U-Net output resolution: splat_size^2 Gaussians per view
    output_size: int  # render resolution used by LGM for this config
    fovy: float = 49.1
    cam_radius: float = 1.5
    layers_per_block: int = 2
    num_heads: int = 16
    norm_groups: int = 32

    @property
    def num_gaussians(self):
        return 4 * self.splat_size ** 2


LGM_CONFIGS = {
    # LGM core/options.py config_defaults['big'] -> 376 tensors, 415,042,848 parameters
    "big": LGMConfig("big", input_size=256, down_channels=(64, 128, 256, 512, 1024, 1024),
                     down_attention=(False, False, False, True, True, True), mid_attention=True,
                     up_channels=(1024, 1024, 512, 256, 128), up_attention=(True, True, True, False, False),
                     splat_size=128, output_size=512),
    # toy world: 64px views -> 4 x 32 x 32 = 4096 Gaussians; same asymmetric structure (one up block fewer
    # than down blocks, so the output is input/2), narrower, attention only at the two lowest resolutions
    "tiny": LGMConfig("tiny", input_size=64, down_channels=(16, 32, 32, 64),
                      down_attention=(False, False, False, True), mid_attention=True,
                      up_channels=(64, 32, 32), up_attention=(True, False, False),
                      splat_size=32, output_size=64, num_heads=4, norm_groups=8),
}

SKIP_SCALE = math.sqrt(0.5)  # every residual is rescaled by sqrt(0.5) (LGM core/unet.py)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * SKIP_SCALE


class _QKVProj(nn.Module):
    # holds LGM's `attn.qkv` (no bias) and `attn.proj` so the state-dict names match
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)


class MVAttention(nn.Module):
    # self-attention over the tokens of all 4 views of an object jointly (view-major) (LGM core/unet.py MVAttention)
    num_views = 4

    def __init__(self, dim, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim, eps=1e-5)
        self.attn = _QKVProj(dim)

    def forward(self, x):
        BV, C, H, W = x.shape
        B = BV // self.num_views
        y = self.norm(x).reshape(B, self.num_views, C, H, W).permute(0, 1, 3, 4, 2).reshape(B, -1, C)
        q, k, v = self.attn.qkv(y).reshape(B, y.shape[1], 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C)
        y = self.attn.proj(y).reshape(B, self.num_views, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W)
        return (y + x) * SKIP_SCALE  # residual on the un-normalised input


class DownBlock(nn.Module):
    def __init__(self, cin, cout, layers, attention, downsample, cfg):
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, cfg.norm_groups) for i in range(layers)])
        # None slots keep LGM's indices without creating keys
        self.attns = nn.ModuleList([MVAttention(cout, cfg.num_heads, cfg.norm_groups) if attention else None
                                    for _ in range(layers)])
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x):
        skips = []
        for net, attn in zip(self.nets, self.attns):
            x = net(x)
            if attn is not None:
                x = attn(x)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, ch, attention, cfg):
        super().__init__()
        self.nets = nn.ModuleList([ResnetBlock(ch, ch, cfg.norm_groups), ResnetBlock(ch, ch, cfg.norm_groups)])
        self.attns = nn.ModuleList([MVAttention(ch, cfg.num_heads, cfg.norm_groups) if attention else None])

    def forward(self, x):
        x = self.nets[0](x)
        if self.attns[0] is not None:
            x = self.attns[0](x)
        return self.nets[1](x)


class UpBlock(nn.Module):
    def __init__(self, cin, cskip_last, cout, layers, attention, upsample, cfg):
        super().__init__()
        # net j sees [x, skip]; only the last skip comes from a shallower level (LGM core/unet.py)
        self.nets = nn.ModuleList([
            ResnetBlock((cin if j == 0 else cout) + (cskip_last if j == layers - 1 else cout), cout, cfg.norm_groups)
            for j in range(layers)])
        self.attns = nn.ModuleList([MVAttention(cout, cfg.num_heads, cfg.norm_groups) if attention else None
                                    for _ in range(layers)])
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x, skips):
        for net, attn in zip(self.nets, self.attns):
            x = net(torch.cat([x, skips.pop()], dim=1))  # LIFO
            if attn is not None:
                x = attn(x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    def __init__(self, cfg, cin=9, cout=14):
        super().__init__()
        dc, uc, L = cfg.down_channels, cfg.up_channels, cfg.layers_per_block
        # up block i consumes the outputs of down block -1-i, so their widths must agree (LGM core/unet.py)
        if len(uc) > len(dc) or any(uc[i] != dc[-1 - i] for i in range(len(uc))):
            raise ValueError(f"LGMConfig {cfg.name!r}: up_channels {uc} must start with reversed down_channels {dc}")
        self.conv_in = nn.Conv2d(cin, dc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(dc[max(i - 1, 0)], dc[i], L, cfg.down_attention[i], i != len(dc) - 1, cfg)
            for i in range(len(dc))])
        self.mid_block = MidBlock(dc[-1], cfg.mid_attention, cfg)
        self.up_blocks = nn.ModuleList([
            UpBlock(uc[max(i - 1, 0)], dc[max(-2 - i, -len(dc))], uc[i], L + 1, cfg.up_attention[i],
                    i != len(uc) - 1, cfg)
            for i in range(len(uc))])
        self.norm_out = nn.GroupNorm(cfg.norm_groups, uc[-1], eps=1e-5)
        self.conv_out = nn.Conv2d(uc[-1], cout, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        skips = [x]  # the first skips are never consumed: that is the asymmetry (output = input / 2)
        for block in self.down_blocks:
            x, s = block(x)
            skips += s
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return self.conv_out(F.silu(self.norm_out(x)))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _config_from_json(d):
    return LGMConfig(**{f.name: (tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name])
                        for f in fields(LGMConfig)})


class LGM(nn.Module):
    def __init__(self, config="big"):
        super().__init__()
        if isinstance(config, str):
            if config not in LGM_CONFIGS:
                raise KeyError(f"LGM: unknown config {config!r}; choose one of {sorted(LGM_CONFIGS)} or pass an LGMConfig")
            config = LGM_CONFIGS[config]
        self.config = config
        self.unet = UNet(config)
        self.conv = nn.Conv2d(14, 14, 1)  # top-level key `conv` (LGM core/unet.py)

    def forward_gaussians(self, images_with_rays):
        cfg, x = self.config, images_with_rays
        s = cfg.input_size
        if x.dim() != 5 or x.shape[1:] != (4, 9, s, s):
            raise ValueError(f"LGM.forward_gaussians: images_with_rays must have shape (B, 4, 9, {s}, {s}) "
                             f"(RGB + Plücker rays, see prepare_inputs), got {tuple(x.shape)}")
        B = x.shape[0]
        x = x.reshape(B * 4, 9, s, s).to(self.conv.weight.dtype)
        x = self.conv(self.unet(x)).float()  # head activations in float32 whatever the model dtype
        x = x.reshape(B, 4, 14, cfg.splat_size, cfg.splat_size).permute(0, 1, 3, 4, 2).reshape(B, -1, 14)
        # LGM core/models.py: clamp / sigmoid / 0.1 softplus / normalise over the LAST dim (fixrot) / 0.5 tanh + 0.5
        return torch.cat([x[..., 0:3].clamp(-1, 1), torch.sigmoid(x[..., 3:4]), 0.1 * F.softplus(x[..., 4:7]),
                          F.normalize(x[..., 7:11], dim=-1), 0.5 * torch.tanh(x[..., 11:14]) + 0.5], dim=-1)

    def prepare_inputs(self, views, c2w):
        cfg = self.config
        if views.dim() != 5 or views.shape[1:3] != (4, 3):
            raise ValueError(f"LGM.prepare_inputs: views must have shape (B, 4, 3, H, W) in [0, 1], got {tuple(views.shape)}")
        c2w = torch.as_tensor(c2w)
        if c2w.shape != (4, 4, 4):
            raise ValueError(f"LGM.prepare_inputs: c2w must have shape (4, 4, 4) (one OpenGL pose per view), "
                             f"got {tuple(c2w.shape)}")
        B, _, _, H, W = views.shape
        s = cfg.input_size
        x = views.reshape(B * 4, 3, H, W)
        if (H, W) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = x.new_tensor(IMAGENET_STD)[:, None, None]
        x = ((x - mean) / std).reshape(B, 4, 3, s, s)
        rays = plucker_rays(c2w.to(device=x.device, dtype=torch.float32), cfg.fovy, s, s).to(x.dtype)
        return torch.cat([x, rays.unsqueeze(0).expand(B, -1, -1, -1, -1)], dim=2)

    def reconstruct(self, views, c2w=None):
        if c2w is None:
            c2w = standard_cameras(0.0, self.config.cam_radius)
        return self.forward_gaussians(self.prepare_inputs(views, c2w))

    # ---- checkpoints: LGM's released safetensors, strictly; our toy LGM in the same format + its config ----

    def save_pretrained(self, path):
        return lgm_weights.write_checkpoint(self.state_dict(), asdict(self.config), path)

    @classmethod
    def from_pretrained(cls, path_or_hub_id=lgm_weights.DEFAULT_HUB_ID, config=None, dtype=torch.float32):
        """config: None -> the config stored by save_pretrained in the file, else "big" (LGM's released weights)."""
        file, state, stored = lgm_weights.read_checkpoint(path_or_hub_id)
        stored = _config_from_json(stored) if stored is not None else None
        if config is None:
            config = stored if stored is not None else "big"
        if isinstance(config, str):
            if config not in LGM_CONFIGS:
                raise KeyError(f"LGM.from_pretrained: unknown config {config!r}; choose one of {sorted(LGM_CONFIGS)}")
            config = LGM_CONFIGS[config]
        if stored is not None and replace(stored, name=config.name) != config:
            raise ValueError(f"LGM.from_pretrained: {file} was saved with config {stored.name!r} ({stored}), "
                             f"but config={config.name!r} was requested; pass config=None to use the stored one")
        with torch.device("meta"):
            model = cls(config)
        lgm_weights.check_state_dict(model, state, file)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return model.eval()



# ------------------------------------------------------------------------------------------------------
# Demo: render a random Gaussian blob from the 4 standard views, then reconstruct it with a random tiny LGM.
# ------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    gen = torch.Generator().manual_seed(0)
    n = 3000
    xyz = (torch.rand(n, 3, generator=gen) - 0.5) * 0.8
    xyz = xyz[xyz.norm(dim=1) < 0.4]  # a ball of Gaussians
    n = xyz.shape[0]
    quat = F.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    rgb = torch.stack([0.5 + xyz[:, 0], 0.5 + xyz[:, 1], 0.5 - xyz[:, 2]], -1).clamp(0, 1)  # colour encodes position
    scene = torch.cat([xyz, torch.full((n, 1), 0.8), 0.01 + 0.02 * torch.rand(n, 3, generator=gen), quat, rgb], -1)[None]
    cams = standard_cameras(0.0, 1.5)
    out = render_gaussians(scene, cams, 49.1, 128, 128)
    grid = out["image"][0].permute(2, 0, 3, 1).reshape(128, 4 * 128, 3)
    os.makedirs("outputs", exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save("outputs/reconstruct_demo.png")
    print("wrote outputs/reconstruct_demo.png (4 standard views, azimuth 0/90/180/270)")
    model = LGM("tiny").eval()
    with torch.no_grad():
        gaussians = model.reconstruct(out["image"])  # views are resized to the tiny input size
        rerender = render_gaussians(gaussians, cams, model.config.fovy, 64, 64)
    print(f"tiny LGM (random weights): {gaussians.shape[1]} Gaussians of 14 channels -> "
          f"re-rendered {tuple(rerender['image'].shape)}")
