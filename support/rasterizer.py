# The Gaussian rasterizer behind LGM's renders: the forward pass of Inria's 3D Gaussian splatting
# (Kerbl et al. 2023), reproduced as batched PyTorch tensor ops (differentiable, CPU or GPU).
#
# Support code: a reader of Carve3D only needs `render_gaussians(gaussians, c2w, fovy, H, W)`. The math follows
# graphdeco-inria/diff-gaussian-rasterization (cuda_rasterizer/forward.cu, auxiliary.h) as installed by LGM
# (ashawkey/diff-gaussian-rasterization), wrapped the way 3DTopia/LGM core/gs.py wraps it; the code is our own.
# Stages: project (per Gaussian and view) -> tile_blocks (which pixel blocks each touches) -> sort_pairs
# ((block, Gaussian) pairs in depth order) -> pair_table (per pair, the exponent as a polynomial in the pixel
# offset) -> blend (front to back in depth chunks, carrying transmittance) -> assemble the images.
import math
from contextlib import contextmanager

import torch

TILE = 16  # Inria's 16x16 tiles decide which Gaussians may touch which pixels (auxiliary.h getRect)
NEAR = 0.2  # hard-coded near cull of the rasterizer (auxiliary.h in_frustum)
ALPHA_MIN, ALPHA_MAX, T_MIN = 1.0 / 255.0, 0.99, 1e-4  # forward.cu renderCUDA
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
    # Standard formula applied to the raw (w, x, y, z): the rasterizer does NOT normalise (forward.cu computeCov3D)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


def _project(gaussians, c2w, tan_x, tan_y, height, width):
    # Per (object, view, Gaussian) preprocessing (forward.cu preprocessCUDA). Returns flattened (I*N,) quantities.
    B, N, _ = gaussians.shape
    V = c2w.shape[1]
    mean, opacity, scale, quat, rgb = gaussians.split([3, 1, 3, 4, 3], dim=-1)
    # OpenGL -> OpenCV camera (x right, y down, z forward) by negating camera axes y and z, then invert (LGM core/gs.py)
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
    # screen mean through the projection matrix's w-divide, with its +1e-7 (auxiliary.h transformPoint4x4)
    u = ((px / (tan_x * (pz + 1e-7)) + 1.0) * width - 1.0) * 0.5
    v = ((py / (tan_y * (pz + 1e-7)) + 1.0) * height - 1.0) * 0.5
    # 3D covariance R S S^T R^T (step 3), then EWA with the Jacobian's x/z, y/z clamped to 1.3 tan (forward.cu computeCov2D)
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
    # Inria's bounding radius: 3 sqrt of the larger eigenvalue with its max(0.1, .) guard (forward.cu preprocessCUDA)
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
    # Which render blocks each Gaussian touches.  Membership is Inria's tile rect (auxiliary.h getRect), further
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
    """gaussians (B, N, 14) [xyz, opacity, scale xyz, rotation wxyz, rgb]; c2w (V,4,4) or (B,V,4,4) OpenGL.
    Returns {"image": (B, V, 3, H, W) in [0,1], "alpha": (B, V, 1, H, W)}.  `block` (pixel block edge,
    dividing 16), `chunk` (Gaussians per depth step; default 32 on CPU, 64 on GPU) and `max_chunk_elements`
    (caps blocks x chunk x pixels per step, i.e. peak memory) trade speed for memory only: the result does not
    depend on them beyond float summation order."""
    # Rendering is float32/float64 math even under a caller's autocast (train.py runs the LGM in bf16):
    # autocast would otherwise run the blending matmuls in bf16.
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        gaussians, c2w, bg = _check_inputs(gaussians, c2w, fovy_deg, height, width, background, block)
        height, width = int(height), int(width)
        B, N, _ = gaussians.shape
        I = B * c2w.shape[1]  # images
        tan_y = math.tan(0.5 * math.radians(float(fovy_deg)))
        tan_x = tan_y * width / height  # square pixels
        grid = _BlockGrid(height, width, block, gaussians.device)
        g = _project(gaussians, c2w, tan_x, tan_y, height, width)
        pairs = _sort_pairs(g, *_tile_blocks(g, height, width, block), I, N, grid)
        table = _pair_table(g, pairs["gid"], pairs["centre"])
        del pairs["gid"], pairs["centre"]
        col, acc, trans = _blend(table, pairs, grid, chunk, max_chunk_elements)
        return _assemble(col, acc, trans, bg, pairs["blocks"], grid, B, c2w.shape[1])


def _check_inputs(gaussians, c2w, fovy_deg, height, width, background, block):
    if not torch.is_tensor(gaussians) or gaussians.dim() != 3 or gaussians.shape[-1] != 14:
        shape = tuple(gaussians.shape) if torch.is_tensor(gaussians) else type(gaussians).__name__
        raise ValueError(f"render_gaussians: gaussians must have shape (B, N, 14) "
                         f"[xyz, opacity, scale, rotation wxyz, rgb], got {shape}")
    if not gaussians.is_floating_point():
        raise ValueError(f"render_gaussians: gaussians must be a float tensor, got {gaussians.dtype}")
    if not bool(torch.isfinite(gaussians).all()):
        raise ValueError("render_gaussians: gaussians contain NaN or inf; check the reconstruction model's output")
    B = gaussians.shape[0]
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
    # half precision is rendered in float32, as LGM's wrapper casts everything to float32 (LGM core/gs.py)
    dtype = gaussians.dtype if gaussians.dtype in (torch.float32, torch.float64) else torch.float32
    gaussians, c2w = gaussians.to(dtype), c2w.to(dtype)
    bg = torch.as_tensor(background, dtype=dtype, device=gaussians.device).reshape(-1)
    if bg.numel() not in (1, 3):
        raise ValueError(f"render_gaussians: background must be a float or 3 values, got shape {tuple(bg.shape)}")
    return gaussians, c2w, bg.expand(3)


class _BlockGrid:
    # The image is cut into block x block pixel blocks (block divides Inria's 16-pixel tile): nbx x nby per image.
    def __init__(self, height, width, block, device):
        self.height, self.width, self.block, self.device = height, width, block, device
        self.nbx, self.nby = -(-width // TILE) * (TILE // block), -(-height // TILE) * (TILE // block)
        self.nblk, self.P = self.nbx * self.nby, block * block


def _sort_pairs(g, bx0, bx1, by0, by1, count, I, N, grid):
    # (block, Gaussian) pairs sorted by (image, block, depth, Gaussian index): sort Gaussians by depth once
    # (stable -> index order on ties, like Inria's radix sort), expand, then stable-sort by block id.
    nbx, nblk, block, dev = grid.nbx, grid.nblk, grid.block, grid.device
    with torch.no_grad():
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
        rem = bid % nblk
        half = 0.5 * (block - 1)
        centre = torch.stack([(rem % nbx) * block, (rem // nbx) * block], -1).to(g["u"].dtype) + half  # per pair
    return {"gid": gid, "centre": centre, "blocks": blocks, "bcount": bcount, "bstart": bstart}


def _pair_table(g, gid, centre):
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
    return torch.cat([torch.cat([coef, pg[:, 6:]], -1), coef.new_tensor([[-1e4] + [0.0] * 8])])


def _block_pixels(blocks, grid, dtype):
    # Pixel offsets (lx, ly) from the block centre as monomials [1, lx, ly, lx^2, lx ly, ly^2] (6, P), and the
    # pixels of each occupied block beyond the image edge (padding: they count as already finished).
    block, nbx, dev = grid.block, grid.nbx, grid.device
    half = 0.5 * (block - 1)
    rem = blocks % grid.nblk
    cx, cy = ((rem % nbx) * block).to(dtype) + half, ((rem // nbx) * block).to(dtype) + half
    lx = torch.arange(block, device=dev, dtype=dtype).repeat(block) - half  # (P,)
    ly = torch.arange(block, device=dev, dtype=dtype).repeat_interleave(block) - half
    monomials = torch.stack([torch.ones_like(lx), lx, ly, lx * lx, lx * ly, ly * ly])  # (6, P)
    stopped = ((cx[:, None] + lx) >= grid.width) | ((cy[:, None] + ly) >= grid.height)  # (A, P)
    return monomials, stopped


def _blend(table, pairs, grid, chunk, max_chunk_elements):
    # Front-to-back alpha blending (forward.cu renderCUDA): per step, the next depth chunk of every unfinished block.
    blocks, bcount, bstart = pairs["blocks"], pairs["bcount"], pairs["bstart"]
    A, P, dev, dtype = blocks.numel(), grid.P, grid.device, table.dtype
    with torch.no_grad():
        monomials, stopped = _block_pixels(blocks, grid, dtype)
    pad_row = table.shape[0] - 1
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
    return col, acc, trans


def _assemble(col, acc, trans, bg, blocks, grid, B, V):
    # colour = sum w c + T_final * bg; blocks without any Gaussian are pure background (T = 1)
    nbx, nby, block, P, I = grid.nbx, grid.nby, grid.block, grid.P, B * V
    out = torch.cat([col + trans[:, None, :] * bg[None, :, None], acc[:, None]], 1)
    empty = torch.cat([bg, bg.new_zeros(1)])[None, :, None].expand(I * grid.nblk, 4, P)
    full = empty.index_copy(0, blocks, out) if blocks.numel() else empty
    full = full.view(I, nby, nbx, 4, block, block).permute(0, 3, 1, 4, 2, 5).reshape(I, 4, nby * block, nbx * block)
    full = full[:, :, :grid.height, :grid.width].reshape(B, V, 4, grid.height, grid.width)
    return {"image": full[:, :, :3].clamp(0.0, 1.0), "alpha": full[:, :, 3:]}
