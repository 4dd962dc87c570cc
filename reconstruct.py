# Reconstruction half of the Carve3D reward (Carve3D Sec. 3.2): LGM (arXiv 2402.05054) turns 4 views into
# 3D Gaussians, and a 3DGS rasterizer renders them back.  Everything follows spec Part B
# (shared/reference/mvdream_lgm_spec.md):
#   cameras + Plücker rays  -> spec B.2 (kiui/LGM OpenGL convention)
#   asymmetric U-Net + head -> spec B.3/B.4 (same module names as 3DTopia/LGM so its checkpoint loads strictly)
#   renderer                -> spec B.5/B.6 (Inria 3DGS forward pass, written as tiled dense PyTorch)
# The math is adapted from LGM (core/unet.py, core/models.py, core/gs.py), kiuikit (cam.py) and
# Inria's diff-gaussian-rasterization (forward.cu); the code is our own.
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------
# Cameras (spec B.2, A.4).  OpenGL camera-to-world: columns [right, up, forward], camera looks along -forward.
# ------------------------------------------------------------------------------------------------------


def _safe_normalize(v):
    # kiui's safe_normalize: divide by sqrt(max(|v|^2, 1e-20)) so a zero vector stays finite (spec B.2)
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
    # LGM's default input poses, in its input order: azimuth 0, 90, 180, 270 (spec B.2)
    return torch.stack([orbit_camera(elevation_deg, az, radius) for az in (0, 90, 180, 270)])


# LGM input view k <- MVDream view MVDREAM_TO_LGM[k]: an empirical 90 degree azimuth offset (spec B.7 step 3)
MVDREAM_TO_LGM = (1, 2, 3, 0)


def mvdream_view_cameras(elevation_deg=0.0, radius=1.5):
    # MVDream view j shows azimuth 90*(j-1) of LGM's world; MVDream's elevation is positive ABOVE, kiui's BELOW
    return torch.stack([orbit_camera(-elevation_deg, 90.0 * ((j - 1) % 4), radius) for j in range(4)])


def plucker_rays(c2w, fovy_deg, height, width):
    # Per-pixel ray (o, d) of an OpenGL pinhole with square pixels, embedded as [o x d, d] (spec B.2).
    c2w = torch.as_tensor(c2w)
    if c2w.dim() != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"plucker_rays: c2w must have shape (V, 4, 4), got {tuple(c2w.shape)}")
    if not c2w.is_floating_point():
        c2w = c2w.float()
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
# Gaussian renderer (spec B.5/B.6): the Inria 3DGS forward pass, reproduced exactly but as batched tensor ops.
# ------------------------------------------------------------------------------------------------------

TILE = 16  # Inria's 16x16 tiles decide which Gaussians may touch which pixels (spec B.6 step 7)
NEAR = 0.2  # hard-coded near cull of the rasterizer (spec B.6 step 1)
ALPHA_MIN, ALPHA_MAX, T_MIN = 1.0 / 255.0, 0.99, 1e-4  # spec B.6 "Per pixel"
LOG_ALPHA_MAX = math.log(ALPHA_MAX)


@contextmanager
def _ieee_fp32_matmul():
    # the renderer's matmuls evaluate Gaussian exponents: TF32 (10-bit mantissa) would visibly change alphas
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _quat_to_rotmat(q):
    # Standard formula applied to the raw (w, x, y, z): the rasterizer does NOT normalise (spec B.6 step 3)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


def _project(gaussians, c2w, tan_x, tan_y, height, width):
    # Per (object, view, Gaussian) preprocessing, spec B.6 steps 1-6. Returns flattened (I*N,) quantities.
    B, N, _ = gaussians.shape
    V = c2w.shape[1]
    mean, opacity, scale, quat, rgb = gaussians.split([3, 1, 3, 4, 3], dim=-1)
    # OpenGL -> OpenCV camera (x right, y down, z forward) by negating camera axes y and z, then invert (spec B.5)
    c2w_cv = c2w * c2w.new_tensor([1.0, -1.0, -1.0, 1.0])
    w2c = torch.linalg.inv(c2w_cv)
    Rw, tw = w2c[..., :3, :3], w2c[..., :3, 3]  # (B, V, 3, 3), (B, V, 3)
    p = torch.einsum("bvij,bnj->bvni", Rw, mean) + tw[:, :, None, :]  # camera-space means (B, V, N, 3)
    px, py, pz = p.unbind(-1)
    valid = pz > NEAR
    # culled Gaussians get z = 1 in the formulas below: their values are never used, and this keeps their
    # (zero) gradients from turning into 0 * inf = NaN for a Gaussian exactly on the camera plane
    pz = torch.where(valid, pz, torch.ones_like(pz))
    fx, fy = width / (2.0 * tan_x), height / (2.0 * tan_y)
    # screen mean through the projection matrix's w-divide, with its +1e-7 (spec B.6 step 2)
    u = ((px / (tan_x * (pz + 1e-7)) + 1.0) * width - 1.0) * 0.5
    v = ((py / (tan_y * (pz + 1e-7)) + 1.0) * height - 1.0) * 0.5
    # 3D covariance R S S^T R^T (step 3), then EWA with the Jacobian's x/z, y/z clamped to 1.3 tan (step 4)
    M = _quat_to_rotmat(quat) * scale[..., None, :]
    cov3 = M @ M.transpose(-1, -2)  # (B, N, 3, 3)
    tx = torch.clamp(px / pz, -1.3 * tan_x, 1.3 * tan_x) * pz
    ty = torch.clamp(py / pz, -1.3 * tan_y, 1.3 * tan_y) * pz
    zero = torch.zeros_like(pz)
    J = torch.stack([fx / pz, zero, -fx * tx / (pz * pz), zero, fy / pz, -fy * ty / (pz * pz)], -1).unflatten(-1, (2, 3))
    T = J @ Rw[:, :, None]  # (B, V, N, 2, 3)
    cov2 = T @ cov3[:, None] @ T.transpose(-1, -2)
    a, b, c = cov2[..., 0, 0] + 0.3, cov2[..., 0, 1], cov2[..., 1, 1] + 0.3  # +0.3 low-pass dilation
    det = a * c - b * b
    valid = valid & (det != 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conic = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    # Inria's bounding radius: 3 sqrt of the larger eigenvalue with its max(0.1, .) guard (step 6)
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
        radius = torch.ceil(3.0 * torch.sqrt(lam))
    flat = lambda t: t.reshape(B * V * N, *t.shape[3:])  # noqa: E731
    op = opacity[..., 0].unsqueeze(1).expand(B, V, N)
    col = rgb.unsqueeze(1).expand(B, V, N, 3)
    return dict(u=flat(u), v=flat(v), conic=flat(conic), opacity=flat(op), rgb=flat(col), depth=flat(pz).detach(),
                valid=flat(valid), radius=flat(radius), a=flat(a).detach(), c=flat(c).detach())


def _tile_blocks(g, height, width, block):
    # Which render blocks each Gaussian touches.  Membership is Inria's tile rect (spec B.6 step 7), further
    # narrowed to the bounding box of the region where alpha >= 1/255 could hold: pixels outside it are
    # skipped by the reference anyway, so this cull is exact (with a 1-pixel safety margin for rounding).
    gx, gy = -(-width // TILE), -(-height // TILE)
    big = float(1 << 22)
    with torch.no_grad():
        u, v, r = g["u"].detach().clamp(-big, big), g["v"].detach().clamp(-big, big), g["radius"]
        rx0 = torch.clamp(torch.floor((u - r) / TILE), 0, gx)
        rx1 = torch.clamp(torch.floor((u + r + TILE - 1) / TILE), 0, gx)
        ry0 = torch.clamp(torch.floor((v - r) / TILE), 0, gy)
        ry1 = torch.clamp(torch.floor((v + r + TILE - 1) / TILE), 0, gy)
        op = g["opacity"].detach()
        # alpha = op*exp(-q/2) >= 1/255  <=>  q <= s := 2 ln(255 op); the ellipse q <= s has half-widths sqrt(s a), sqrt(s c)
        s = 2.0 * torch.log(torch.clamp(op * 255.0, min=1e-30))
        ex = torch.sqrt(torch.clamp(s * g["a"], min=0.0)).clamp(max=big) + 1.0
        ey = torch.sqrt(torch.clamp(s * g["c"], min=0.0)).clamp(max=big) + 1.0
        x0 = torch.maximum(rx0 * TILE, torch.ceil(u - ex)).clamp(min=0)
        x1 = torch.minimum(rx1 * TILE - 1, torch.floor(u + ex)).clamp(max=width - 1)
        y0 = torch.maximum(ry0 * TILE, torch.ceil(v - ey)).clamp(min=0)
        y1 = torch.minimum(ry1 * TILE - 1, torch.floor(v + ey)).clamp(max=height - 1)
        keep = g["valid"] & (s >= 0) & (x0 <= x1) & (y0 <= y1)
        bx0, bx1 = (x0 // block).long(), (x1 // block).long()
        by0, by1 = (y0 // block).long(), (y1 // block).long()
        count = torch.where(keep, (bx1 - bx0 + 1) * (by1 - by0 + 1), torch.zeros_like(bx0))
    return bx0, bx1, by0, by1, count


def render_gaussians(gaussians, c2w, fovy_deg, height, width, background=1.0, *, block=8, chunk=None,
                     max_chunk_elements=2 ** 26):
    # Rendering is float32/float64 math even under a caller's autocast (train.py runs the LGM in bf16):
    # autocast would otherwise run the blending matmuls in bf16.
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return _render_gaussians(gaussians, c2w, fovy_deg, height, width, background, block=block, chunk=chunk,
                                 max_chunk_elements=max_chunk_elements)


def _render_gaussians(gaussians, c2w, fovy_deg, height, width, background=1.0, *, block=8, chunk=None,
                      max_chunk_elements=2 ** 26):
    """gaussians (B, N, 14) [xyz, opacity, scale xyz, rotation wxyz, rgb]; c2w (V,4,4) or (B,V,4,4) OpenGL.
    Returns {"image": (B, V, 3, H, W) in [0,1], "alpha": (B, V, 1, H, W)}.  `block` (pixel block edge,
    dividing 16), `chunk` (Gaussians per depth step; default 32 on CPU, 64 on GPU) and `max_chunk_elements`
    (caps blocks x chunk x pixels per step, i.e. peak memory) trade speed for memory only: the result does not
    depend on them beyond float summation order."""
    if not torch.is_tensor(gaussians) or gaussians.dim() != 3 or gaussians.shape[-1] != 14:
        shape = tuple(gaussians.shape) if torch.is_tensor(gaussians) else type(gaussians).__name__
        raise ValueError(f"render_gaussians: gaussians must have shape (B, N, 14) "
                         f"[xyz, opacity, scale, rotation wxyz, rgb], got {shape}")
    if not gaussians.is_floating_point():
        raise ValueError(f"render_gaussians: gaussians must be a float tensor, got {gaussians.dtype}")
    if not bool(torch.isfinite(gaussians).all()):
        raise ValueError("render_gaussians: gaussians contain NaN or inf; check the reconstruction model's output")
    B, N, _ = gaussians.shape
    c2w = torch.as_tensor(c2w, device=gaussians.device)
    if c2w.dim() == 3 and c2w.shape[1:] == (4, 4):
        c2w = c2w.unsqueeze(0).expand(B, -1, -1, -1)
    elif not (c2w.dim() == 4 and c2w.shape[0] == B and c2w.shape[2:] == (4, 4)):
        raise ValueError(f"render_gaussians: c2w must have shape (V, 4, 4) or (B={B}, V, 4, 4), got {tuple(c2w.shape)}")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"render_gaussians: height and width must be positive integers, got {height}x{width}")
    if not 0.0 < float(fovy_deg) < 180.0:
        raise ValueError(f"render_gaussians: fovy_deg must be in (0, 180) degrees, got {fovy_deg}")
    if block not in (1, 2, 4, 8, 16):
        raise ValueError(f"render_gaussians: block must divide the 16-pixel tile (1, 2, 4, 8, 16), got {block}")
    height, width = int(height), int(width)
    # half precision is rendered in float32, as LGM's wrapper casts everything to float32 (spec B.5)
    dtype = gaussians.dtype if gaussians.dtype in (torch.float32, torch.float64) else torch.float32
    gaussians, c2w = gaussians.to(dtype), c2w.to(dtype)
    bg = torch.as_tensor(background, dtype=dtype, device=gaussians.device).reshape(-1)
    if bg.numel() not in (1, 3):
        raise ValueError(f"render_gaussians: background must be a float or 3 values, got shape {tuple(bg.shape)}")
    bg = bg.expand(3)
    V = c2w.shape[1]
    I = B * V  # images
    tan_y = math.tan(0.5 * math.radians(float(fovy_deg)))
    tan_x = tan_y * width / height  # square pixels

    g = _project(gaussians, c2w, tan_x, tan_y, height, width)
    bx0, bx1, by0, by1, count = _tile_blocks(g, height, width, block)
    nbx, nby = -(-width // TILE) * (TILE // block), -(-height // TILE) * (TILE // block)
    nblk, P, dev = nbx * nby, block * block, gaussians.device

    with torch.no_grad():
        # (block, Gaussian) pairs sorted by (image, block, depth, Gaussian index): sort Gaussians by depth once
        # (stable -> index order on ties, like Inria's radix sort), expand, then stable-sort by block id.
        order = torch.sort(g["depth"].view(I, N), dim=1, stable=True).indices
        order = (order + (torch.arange(I, device=dev) * N)[:, None]).reshape(-1)
        order = order[count.index_select(0, order) > 0]
        cnt = count.index_select(0, order)
        gid = torch.repeat_interleave(order, cnt)
        k = torch.arange(gid.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        geo = torch.stack([bx0, by0, bx1 - bx0 + 1], -1).index_select(0, gid)  # rect origin and width per pair
        bid = (gid // N) * nblk + (geo[:, 1] + k // geo[:, 2]) * nbx + (geo[:, 0] + k % geo[:, 2])
        del k, geo  # the pair arrays dominate memory at 512 px: free temporaries early
        bid, perm = torch.sort(bid, stable=True)
        gid = gid.index_select(0, perm)
        del perm
        blocks, bcount = torch.unique_consecutive(bid, return_counts=True)  # blocks with >= 1 Gaussian
        bstart = torch.cumsum(bcount, 0) - bcount
        A = blocks.numel()
        # block centres; pixels are addressed by their offset from the centre to keep the quadratic small
        half = 0.5 * (block - 1)
        rem = blocks % nblk
        cx, cy = ((rem % nbx) * block).to(dtype) + half, ((rem // nbx) * block).to(dtype) + half
        lx = torch.arange(block, device=dev, dtype=dtype).repeat(block) - half  # (P,)
        ly = torch.arange(block, device=dev, dtype=dtype).repeat_interleave(block) - half
        monomials = torch.stack([torch.ones_like(lx), lx, ly, lx * lx, lx * ly, ly * ly])  # (6, P)
        # padding pixels beyond the image edge count as already finished
        stopped = ((cx[:, None] + lx) >= width) | ((cy[:, None] + ly) >= height)  # (A, P)
        rem = bid % nblk
        centre = torch.stack([(rem % nbx) * block, (rem // nbx) * block], -1).to(dtype) + half  # per pair
        del rem, bid

    # Per pair, power + ln(opacity) is a quadratic polynomial in the pixel offset (lx, ly) from the block
    # centre, so each depth chunk needs one small matmul instead of a dozen elementwise passes:
    # with d = (du - lx, dv - ly), power = a d_x^2 + b d_x d_y + c d_y^2 and (a, b, c) = -(A/2, B, C/2).
    per_gauss = torch.cat([g["u"][:, None], g["v"][:, None], g["conic"] * g["conic"].new_tensor([-0.5, -1.0, -0.5]),
                           torch.log(g["opacity"].clamp(min=1e-30))[:, None], g["rgb"]], -1)  # (I*N, 9)
    pg = per_gauss.index_select(0, gid)
    du, dv = pg[:, 0] - centre[:, 0], pg[:, 1] - centre[:, 1]
    a, b, c = pg[:, 2], pg[:, 3], pg[:, 4]
    coef = torch.stack([pg[:, 5] + a * du * du + b * du * dv + c * dv * dv,
                        -2 * a * du - b * dv, -b * du - 2 * c * dv, a, b, c], -1)
    # one extra row for the padding slots of the last chunk of a block: exp(-1e4) = 0 -> skipped
    table = torch.cat([torch.cat([coef, pg[:, 6:]], -1), coef.new_tensor([[-1e4] + [0.0] * 8])])
    pad_row = table.shape[0] - 1
    del pg, du, dv, a, b, c, coef, centre, gid

    if chunk is None:
        chunk = 64 if dev.type == "cuda" else 32
    chunk = min(int(chunk), max(8, max_chunk_elements // max(A * P, 1)))
    trans = torch.ones(A, P, dtype=dtype, device=dev)  # transmittance T carried across depth chunks
    col = torch.zeros(A, 3, P, dtype=dtype, device=dev)  # per pixel: sum of w * rgb
    acc = torch.zeros(A, P, dtype=dtype, device=dev)  # per pixel: sum of w (the alpha output)
    done = torch.zeros(A, dtype=torch.bool, device=dev)
    with _ieee_fp32_matmul():
        for c0 in range(0, int(bcount.max()) if A else 0, chunk):
            with torch.no_grad():
                sel = torch.nonzero((bcount > c0) & ~done).squeeze(1)
                if sel.numel() == 0:
                    break
                rank = c0 + torch.arange(chunk, device=dev)
                rows = torch.where(rank < bcount[sel, None], bstart[sel, None] + rank, pad_row)
            n = sel.numel()
            rows = table.index_select(0, rows.view(-1)).view(n, chunk, 9)
            # alpha = min(0.99, opacity exp(power)) = exp(min(ln 0.99, power + ln opacity)), skipped (= 0) below
            # 1/255.  The lower clamp at -20 (alpha 2e-9, skipped anyway) keeps exp off its slow underflow path.
            # (power > 0 cannot happen: conics that pass the det test are positive definite after the +0.3.)
            alpha = torch.exp((rows[..., :6] @ monomials).clamp(-20.0, LOG_ALPHA_MAX))
            alpha = torch.threshold(alpha, ALPHA_MIN, 0.0)
            # T after each Gaussian; a Gaussian is blended iff T after it stays >= 1e-4 (threshold -> 0 if not).
            # T is non-increasing, so the blended set is a prefix: exactly the reference's early stop.
            # Pixels that stopped in an earlier chunk run with T = 0.
            t_sel, was_stopped = trans[sel], stopped[sel]
            t_run = t_sel * ~was_stopped
            one_minus = 1.0 - alpha  # >= 0.01 thanks to the 0.99 cap, so dividing by it is safe
            t_incl = torch.threshold(torch.cumprod(one_minus, dim=1) * t_run[:, None, :], T_MIN, 0.0)
            w = t_incl * (alpha / one_minus)  # blending weights alpha_i T_i (T_i = T before Gaussian i), (n, C, P)
            w_sum = w.sum(1)
            # in-place accumulation is autograd-safe here: index_add_/index_copy_ never need the old values
            col.index_add_(0, sel, torch.bmm(rows[..., 6:].transpose(1, 2), w))
            acc.index_add_(0, sel, w_sum)
            # T after the last blended Gaussian = T - its weights (frozen where the pixel had already stopped)
            trans.index_copy_(0, sel, torch.where(was_stopped, t_sel, t_run - w_sum))
            with torch.no_grad():
                now_stopped = t_incl[:, -1, :] == 0
                stopped[sel] = now_stopped
                done[sel] = now_stopped.all(1)

    # colour = sum w c + T_final * bg; blocks without any Gaussian are pure background (T = 1)
    out = torch.cat([col + trans[:, None, :] * bg[None, :, None], acc[:, None]], 1)
    empty = torch.cat([bg, bg.new_zeros(1)])[None, :, None].expand(I * nblk, 4, P)
    full = empty.index_copy(0, blocks, out) if A else empty
    full = full.view(I, nby, nbx, 4, block, block).permute(0, 3, 1, 4, 2, 5).reshape(I, 4, nby * block, nbx * block)
    full = full[:, :, :height, :width].reshape(B, V, 4, height, width)
    return {"image": full[:, :, :3].clamp(0.0, 1.0), "alpha": full[:, :, 3:]}


# ------------------------------------------------------------------------------------------------------
# LGM: asymmetric multi-view U-Net -> 14 Gaussian channels per output pixel (spec B.1, B.3, B.4).
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
    # spec B.1: LGM `big` -> 376 tensors, 415,042,848 parameters
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

SKIP_SCALE = math.sqrt(0.5)  # every residual is rescaled by sqrt(0.5) (spec B.3)


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
    # self-attention over the tokens of all 4 views of an object jointly (view-major), spec B.3
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
        # net j sees [x, skip]; only the last skip comes from a shallower level (spec B.3)
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
        # up block i consumes the outputs of down block -1-i, so their widths must agree (spec B.3)
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
DEFAULT_HUB_ID = "ashawkey/LGM"
CHECKPOINT_NAMES = ("model_fp16_fixrot.safetensors", "model.safetensors")  # fixrot weights first (spec B.1, B.4)


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
        self.conv = nn.Conv2d(14, 14, 1)  # top-level key `conv` (spec B.3)

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
        # spec B.4: clamp / sigmoid / 0.1 softplus / normalise over the LAST dim (fixrot) / 0.5 tanh + 0.5
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

    # ---- checkpoints: strict loading of LGM's safetensors, and our own save format for the toy model ----

    def save_pretrained(self, path):
        # path: a directory (writes model.safetensors + config.json) or a *.safetensors file (+ sibling .json)
        from safetensors.torch import save_file
        path = Path(path)
        if path.suffix == ".safetensors":
            file, cfg_file = path, path.with_suffix(".json")
        else:
            file, cfg_file = path / "model.safetensors", path / "config.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        cfg_json = json.dumps(asdict(self.config))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(file), metadata={"format": "pt", "carve3d_lgm_config": cfg_json})
        cfg_file.write_text(cfg_json + "\n")
        return file

    @classmethod
    def from_pretrained(cls, path_or_hub_id=DEFAULT_HUB_ID, config=None, dtype=torch.float32):
        """config: None -> the config stored by save_pretrained in the file, else "big" (LGM's released weights)."""
        from safetensors import safe_open
        file = _resolve_checkpoint(path_or_hub_id)
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        stored = _config_from_json(json.loads(meta["carve3d_lgm_config"])) if "carve3d_lgm_config" in meta else None
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
        _check_state_dict(model, state, file)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return model.eval()


def _check_state_dict(model, state, file):
    # strict: every key present, nothing extra, every shape equal -- never a silent partial load
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        def show(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {show(wrong)}")
        raise KeyError(f"LGM checkpoint {file} does not match config {model.config.name!r}: " + "; ".join(parts)
                       + ". Use the checkpoint that belongs to this config (or pass the matching config=).")


def _download_hint(repo, fname, local_dir):
    # huggingface_hub >= 1.0 ships the `hf` CLI; older releases call it `huggingface-cli`
    return (f"`hf download {repo} {fname} --local-dir {local_dir}` (older huggingface_hub: "
            f"`huggingface-cli download {repo} {fname} --local-dir {local_dir}`)")


def _resolve_checkpoint(path_or_hub_id):
    p = Path(path_or_hub_id)
    if p.is_file():
        return p
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"LGM.from_pretrained: directory {p} contains none of {list(CHECKPOINT_NAMES)}; "
                                f"download LGM's weights into it with "
                                f"{_download_hint(DEFAULT_HUB_ID, CHECKPOINT_NAMES[0], p)}")
    s = str(path_or_hub_id)
    if s.endswith(".safetensors") or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"LGM.from_pretrained: no such file or directory: {s}")
    fname = CHECKPOINT_NAMES[0]
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id=s, filename=fname))
    except Exception as e:  # offline, no such repo, no access: one actionable message, no chained traceback
        raise FileNotFoundError(
            f"LGM.from_pretrained: {s!r} is not a local file or directory, and {fname!r} could not be fetched "
            f"from the Hugging Face Hub repo {s!r} ({type(e).__name__}; offline?). On a machine with internet "
            f"access run {_download_hint(s, fname, 'checkpoints/lgm')}, copy checkpoints/lgm/ into the "
            f"working directory and call LGM.from_pretrained('checkpoints/lgm')") from None


# ------------------------------------------------------------------------------------------------------
# Demo: render a random Gaussian blob from the 4 standard views, then reconstruct it with a random tiny LGM.
# ------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import numpy as np
    from PIL import Image

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
