# Tests for reconstruct.py: cameras/rays (kiui/cam.py, LGM core/utils.py), the 3DGS renderer against an
# independent per-pixel reference written here from Inria's forward.cu, closed forms, gradcheck, and the LGM
# U-Net / checkpoint handling (LGM core/unet.py, core/models.py).
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reconstruct as R  # noqa: E402

FOVY = 49.1
# names and shapes of every tensor in LGM big's released checkpoint (hub ashawkey/LGM, model_fp16_fixrot.safetensors)
KEYS_FILE = Path(__file__).parent / "data" / "lgm_big_keys.txt"


# ------------------------------------------------------------------------------------------------------
# Independent reference rasterizer: plain Python loops over pixels and Gaussians, float64, Inria's forward.cu.
# ------------------------------------------------------------------------------------------------------


def reference_render(gaussians, c2w_gl, fovy, H, W, bg=1.0, use_rect=True):
    g = np.asarray(gaussians, dtype=np.float64)
    c2w = np.asarray(c2w_gl, dtype=np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL -> OpenCV
    w2c = np.linalg.inv(c2w)
    Rv, tv = w2c[:3, :3], w2c[:3, 3]
    tan_y = math.tan(math.radians(fovy) / 2)
    tan_x = tan_y * W / H
    fx, fy = W / (2 * tan_x), H / (2 * tan_y)
    grid_x, grid_y = (W + 15) // 16, (H + 15) // 16
    splats = []
    for i, row in enumerate(g):
        mu, o, s, q, col = row[0:3], row[3], row[4:7], row[7:11], row[11:14]
        x, y, z = Rv @ mu + tv
        if z <= 0.2:
            continue
        u = ((x / (tan_x * (z + 1e-7)) + 1) * W - 1) / 2
        v = ((y / (tan_y * (z + 1e-7)) + 1) * H - 1) / 2
        qw, qx, qy, qz = q
        Rq = np.array([[1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)],
                       [2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)],
                       [2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)]])
        M = Rq @ np.diag(s)
        cov3 = M @ M.T
        txc = min(1.3 * tan_x, max(-1.3 * tan_x, x / z)) * z
        tyc = min(1.3 * tan_y, max(-1.3 * tan_y, y / z)) * z
        J = np.array([[fx / z, 0, -fx * txc / z ** 2], [0, fy / z, -fy * tyc / z ** 2]])
        T = J @ Rv
        cov = T @ cov3 @ T.T
        a, b, c = cov[0, 0] + 0.3, cov[0, 1], cov[1, 1] + 0.3
        det = a * c - b * b
        if det == 0:
            continue
        conic = (c / det, -b / det, a / det)
        mid = 0.5 * (a + c)
        lam = mid + math.sqrt(max(0.1, mid * mid - det))
        r = math.ceil(3 * math.sqrt(lam))
        rect = (min(grid_x, max(0, int((u - r) / 16))), min(grid_x, max(0, int((u + r + 15) / 16))),
                min(grid_y, max(0, int((v - r) / 16))), min(grid_y, max(0, int((v + r + 15) / 16))))
        if (rect[1] - rect[0]) * (rect[3] - rect[2]) == 0:
            continue
        splats.append((z, i, u, v, conic, o, col, rect))
    splats.sort(key=lambda t: (t[0], t[1]))  # depth, ties by index (stable radix sort)
    img, alpha_img = np.zeros((3, H, W)), np.zeros((1, H, W))
    stats = {"stops": 0, "beyond_rect": 0, "power_pos": 0}
    for py in range(H):
        for px in range(W):
            tx, ty = px // 16, py // 16
            T, C, Wacc = 1.0, np.zeros(3), 0.0
            for z, i, u, v, (A, B, Cc), o, col, rect in splats:
                inside = rect[0] <= tx < rect[1] and rect[2] <= ty < rect[3]
                dx, dy = u - px, v - py
                power = -0.5 * (A * dx * dx + Cc * dy * dy) - B * dx * dy
                if not inside:
                    if use_rect:
                        if power <= 0 and min(0.99, o * math.exp(power)) >= 1 / 255:
                            stats["beyond_rect"] += 1
                        continue
                if power > 0:
                    stats["power_pos"] += 1
                    continue
                alpha = min(0.99, o * math.exp(power))
                if alpha < 1 / 255:
                    continue
                test_T = T * (1 - alpha)
                if test_T < 1e-4:
                    stats["stops"] += 1
                    break
                C += col * alpha * T
                Wacc += alpha * T
                T = test_T
            img[:, py, px] = C + T * bg
            alpha_img[0, py, px] = Wacc
    return np.clip(img, 0, 1), alpha_img, stats


def random_scene(gen, n, opacity=(0.05, 0.95), scale=(0.02, 0.15)):
    xyz = (torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    op = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    sc = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=gen, dtype=torch.float64)
    q = F.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=-1)
    q = q * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))  # NOT unit: the rasterizer uses it raw
    rgb = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    return torch.cat([xyz, op, sc, q, rgb], -1)


CAMS = torch.stack([R.orbit_camera(0, 0, 1.5), R.orbit_camera(20, 45, 1.5), R.orbit_camera(-35, 200, 1.2),
                    R.orbit_camera(10, 300, 0.9)]).double()


def compare(scene, cams, H, W, bg=1.0, **kw):
    out = R.render_gaussians(scene[None], cams, FOVY, H, W, background=bg, **kw)
    stats_all = []
    for k in range(cams.shape[0]):
        img, al, stats = reference_render(scene.numpy(), cams[k].numpy(), FOVY, H, W, bg)
        stats_all.append(stats)
        np.testing.assert_allclose(out["image"][0, k].numpy(), img, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out["alpha"][0, k].numpy(), al, atol=1e-5, rtol=0)
    return stats_all


# ------------------------------------------------------------------------------------------------------
# Renderer vs reference
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block,chunk", [(8, 128), (4, 3), (16, 5)])
def test_render_matches_reference_random_scene(block, chunk):
    gen = torch.Generator().manual_seed(1)
    scene = random_scene(gen, 20)
    # a Gaussian behind camera 0 and one between it and its 0.2 near plane: both must be culled
    extra = scene[:2].clone()
    extra[0, :3] = torch.tensor([0.05, 0.0, 1.9])
    extra[1, :3] = torch.tensor([0.0, 0.02, 1.35])
    extra[:, 3] = 0.9
    scene = torch.cat([scene, extra])
    stats = compare(scene, CAMS, 20, 24, block=block, chunk=chunk)  # non-square image, partial tiles
    assert sum(s["beyond_rect"] for s in stats) > 0  # the tile rect matters in this scene


def test_render_reference_sensitivity():
    # the comparison can fail: the reference without the tile-rect rule gives a different image
    gen = torch.Generator().manual_seed(1)
    scene = random_scene(gen, 20)
    diffs = []
    for cam in CAMS:
        img_rect, _, st = reference_render(scene.numpy(), cam.numpy(), FOVY, 20, 24)
        img_free, _, _ = reference_render(scene.numpy(), cam.numpy(), FOVY, 20, 24, use_rect=False)
        diffs.append(np.abs(img_rect - img_free).max() if st["beyond_rect"] else 0.0)
    assert max(diffs) > 1e-4  # well above the 1e-5 tolerance of the comparison


def test_render_high_opacity_early_stop():
    gen = torch.Generator().manual_seed(2)
    scene = random_scene(gen, 16, opacity=(0.9, 0.999), scale=(0.08, 0.2))
    scene[:, :3] *= 0.3  # pile them up in front of the cameras
    scene[::3, 3] = 1.0  # alpha capped at 0.99
    stats = compare(scene, CAMS[:2], 20, 24, bg=0.3, chunk=4)
    assert sum(s["stops"] for s in stats) > 50  # many pixels hit T < 1e-4


def _place(c2w_gl, u, v, z, H, W):
    # world point that projects to pixel (u, v) at camera depth z (inverse of the projection)
    tan_y = math.tan(math.radians(FOVY) / 2)
    tan_x = tan_y * W / H
    xc = (2 * u + 1 - W) / W * tan_x * z
    yc = (2 * v + 1 - H) / H * tan_y * z
    c2w = c2w_gl.double() @ torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    return (c2w @ torch.tensor([xc, yc, z, 1.0], dtype=torch.float64))[:3]


def test_render_alpha_beyond_tile_rect_is_dropped():
    # opaque Gaussian with sigma ~1 px at u = 12.9: its 3-sigma rect ends at tile 0, yet alpha at pixel 16
    # (tile 1) is ~0.0078 >= 1/255.  The reference (and the CUDA rasterizer) give that pixel nothing.
    cam = CAMS[0]
    H, W = 20, 40
    z = 1.5
    f = H / (2 * math.tan(math.radians(FOVY) / 2))
    s = math.sqrt(1.0 - 0.3) * z / f  # -> 2D variance exactly 1.0 on the optical axis, ~1 off-axis
    mu = _place(cam, 12.9, 9.5, z, H, W)
    scene = torch.cat([mu, torch.tensor([0.95, s, s, s, 1, 0, 0, 0, 0.1, 0.2, 0.9], dtype=torch.float64)])[None]
    stats = compare(scene, cam[None], H, W)
    assert stats[0]["beyond_rect"] > 0
    out = R.render_gaussians(scene[None], cam[None], FOVY, H, W)
    assert out["alpha"][0, 0, 0, 9, 16] == 0 and out["alpha"][0, 0, 0, 9, 15] > 1e-3


def test_render_tile_rect_uses_inria_radius():
    # 2D variance ~0.9 at u = 13.5: r = ceil(3 sqrt(0.9 + sqrt(0.1))) = 4 reaches tile 1 (13.5 + 4 + 15 >= 32);
    # without the max(0.1, .) term r would be 3 and pixel 16 (alpha ~0.03 there) would stay empty
    cam = CAMS[0]
    H, W, z = 20, 40, 1.5
    f = H / (2 * math.tan(math.radians(FOVY) / 2))
    s = math.sqrt(0.9 - 0.3) * z / f
    mu = _place(cam, 13.5, 9.5, z, H, W)
    scene = torch.cat([mu, torch.tensor([0.95, s, s, s, 1, 0, 0, 0, 0.1, 0.2, 0.9], dtype=torch.float64)])[None]
    compare(scene, cam[None], H, W)
    out = R.render_gaussians(scene[None], cam[None], FOVY, H, W)
    assert out["alpha"][0, 0, 0, 9, 16] > 0.02


@pytest.mark.parametrize("o", [0.7, 1.0])  # 1.0 hits the 0.99 alpha cap at the centre
def test_render_single_isotropic_gaussian_closed_form(o):
    # Gaussian at the origin seen head-on from (0, 0, 1.5): 2D variance (f s / z)^2 + 0.3 (the dilation)
    H = W = 33
    s, col = 0.03, torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    scene = torch.cat([torch.zeros(3, dtype=torch.float64), torch.tensor([o, s, s, s, 1, 0, 0, 0], dtype=torch.float64),
                       col])[None, None]
    for bg in (1.0, 0.0):
        out = R.render_gaussians(scene, CAMS[:1], FOVY, H, W, background=bg)
        f = H / (2 * math.tan(math.radians(FOVY) / 2))
        var = (f * s / 1.5) ** 2 + 0.3
        r = math.ceil(3 * math.sqrt(var + math.sqrt(0.1)))
        t0, t1 = math.floor((16 - r) / 16), math.floor((16 + r + 15) / 16)  # tile rect, same in x and y
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
        alpha = (o * torch.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / (2 * var))).clamp(max=0.99)
        inside = ((xx // 16 >= t0) & (xx // 16 < t1) & (yy // 16 >= t0) & (yy // 16 < t1))
        alpha = torch.where((alpha >= 1 / 255) & inside, alpha, torch.zeros_like(alpha))
        expect = alpha * col[:, None, None] + (1 - alpha) * bg
        torch.testing.assert_close(out["alpha"][0, 0, 0], alpha, atol=1e-9, rtol=0)
        torch.testing.assert_close(out["image"][0, 0], expect, atol=1e-9, rtol=0)
        # without the +0.3 the closed form would be visibly different, so the test sees the dilation
        no_dil = o * torch.exp(-torch.tensor(4.0) / (2 * (var - 0.3)))
        assert abs(out["alpha"][0, 0, 0, 16, 18] - no_dil) > 1e-2
        assert abs(out["alpha"][0, 0, 0, 16, 16] - min(o, 0.99)) < 1e-12


def test_render_batched_and_float32_consistent():
    gen = torch.Generator().manual_seed(3)
    scenes = torch.stack([random_scene(gen, 30), random_scene(gen, 30)])
    cams = torch.stack([CAMS[:3], CAMS[1:]])  # per-object cameras (B, V, 4, 4)
    out = R.render_gaussians(scenes, cams, FOVY, 20, 24)
    for b in range(2):
        single = R.render_gaussians(scenes[b:b + 1], cams[b], FOVY, 20, 24)
        torch.testing.assert_close(out["image"][b], single["image"][0], atol=1e-12, rtol=0)
    out32 = R.render_gaussians(scenes.float(), cams.float(), FOVY, 20, 24)
    assert out32["image"].dtype == torch.float32
    torch.testing.assert_close(out32["image"].double(), out["image"], atol=1e-4, rtol=0)


def test_render_gradcheck():
    gen = torch.Generator().manual_seed(4)
    scene = random_scene(gen, 3, opacity=(0.3, 0.8), scale=(0.15, 0.3))
    scene[:, :3] *= 0.3
    parts = [p.clone().requires_grad_(True) for p in scene.split([3, 1, 3, 4, 3], dim=-1)]
    cams = CAMS[:2]

    def fn(means, opac, scales, rots, rgb):
        out = R.render_gaussians(torch.cat([means, opac, scales, rots, rgb], -1)[None], cams, FOVY, 8, 10,
                                 background=0.5, chunk=2)
        return out["image"], out["alpha"]

    assert torch.autograd.gradcheck(fn, parts, eps=1e-6, atol=1e-6, fast_mode=True)


def test_render_gradients_finite_for_culled_gaussians():
    # a Gaussian exactly on camera 0's plane (z = 0) and one with opacity 0 must not poison the gradients
    scene = random_scene(torch.Generator().manual_seed(6), 6)
    scene[0, :3] = torch.tensor([0.3, 0.1, 1.5])
    scene[1, 3] = 0.0
    scene.requires_grad_(True)
    out = R.render_gaussians(scene[None], CAMS[:2], FOVY, 12, 12)
    (out["image"].sum() + out["alpha"].sum()).backward()
    assert torch.isfinite(scene.grad).all() and scene.grad[2:].abs().sum() > 0


def test_render_rejects_bad_input():
    good = random_scene(torch.Generator().manual_seed(5), 4)[None]
    with pytest.raises(ValueError, match="gaussians"):
        R.render_gaussians(good[..., :13], CAMS, FOVY, 8, 8)
    with pytest.raises(ValueError, match="c2w"):
        R.render_gaussians(good, CAMS[:, :3], FOVY, 8, 8)
    bad = good.clone()
    bad[0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        R.render_gaussians(bad, CAMS, FOVY, 8, 8)
    bad[0, 1, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        R.render_gaussians(bad, CAMS, FOVY, 8, 8)


# ------------------------------------------------------------------------------------------------------
# Cameras and rays (kiui/cam.py, LGM core/utils.py, app.py)
# ------------------------------------------------------------------------------------------------------


def test_plucker_rays_reference_values():
    rays = R.plucker_rays(R.standard_cameras(0.0, 1.5), FOVY, 256, 256)
    assert rays.shape == (4, 6, 256, 256) and rays.dtype == torch.float32
    expect = {(0, 0, 0): (-0.57394, -0.57394, 0, -0.38263, 0.38263, -0.84095),
              (0, 128, 128): (0.00268, 0.00268, 0, 0.00178, -0.00178, -1.0),
              (1, 0, 0): (0, -0.57394, 0.57394, -0.84095, 0.38263, 0.38263)}
    for (v, y, x), val in expect.items():
        torch.testing.assert_close(rays[v, :, y, x], torch.tensor(val), atol=2e-5, rtol=0)


def test_orbit_camera_convention():
    for e, a, r in [(0, 0, 1.5), (30, 45, 1.5), (-60, 200, 2.0), (15, 270, 1.0)]:
        c2w = R.orbit_camera(e, a, r).double()
        er, ar = math.radians(e), math.radians(a)
        pos = torch.tensor([r * math.cos(er) * math.sin(ar), -r * math.sin(er), r * math.cos(er) * math.cos(ar)],
                           dtype=torch.float64)
        torch.testing.assert_close(c2w[:3, 3], pos, atol=1e-6, rtol=0)  # positive elevation = below
        Rm = c2w[:3, :3]
        torch.testing.assert_close(Rm.T @ Rm, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
        assert abs(torch.linalg.det(Rm) - 1) < 1e-6
        torch.testing.assert_close(-Rm[:, 2], -pos / pos.norm(), atol=1e-6, rtol=0)  # looks at the origin
        assert abs(Rm[1, 0]) < 1e-6  # no roll: right vector horizontal
    assert R.orbit_camera(0, 0).dtype == torch.float32
    assert R.standard_cameras().shape == (4, 4, 4)


def test_mvdream_cameras_map_to_lgm_order():
    for e in (0.0, 15.0, -20.0):
        torch.testing.assert_close(R.mvdream_view_cameras(e)[list(R.MVDREAM_TO_LGM)], R.standard_cameras(-e))
    # MVDream elevation is positive ABOVE the object (world y up)
    assert (R.mvdream_view_cameras(15.0)[:, 1, 3] > 0).all()


def test_rays_and_renderer_share_pixel_convention():
    # a small opaque Gaussian on the ray of pixel (row 5, col 7) renders brightest at that pixel
    H, W = 12, 16
    cam = R.orbit_camera(20, 60, 1.5).double()
    rays = R.plucker_rays(cam[None], FOVY, H, W)
    d = rays[0, 3:, 5, 7]
    mu = cam[:3, 3] + 1.4 * d
    scene = torch.cat([mu, torch.tensor([0.9, 0.004, 0.004, 0.004, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float64)])
    alpha = R.render_gaussians(scene[None, None], cam[None], FOVY, H, W)["alpha"][0, 0, 0]
    assert divmod(int(alpha.argmax()), W) == (5, 7)
    assert alpha[5, 7] > 0.85  # centred within rounding, not half a pixel off


# ------------------------------------------------------------------------------------------------------
# LGM network (LGM core/unet.py, core/models.py) and checkpoints
# ------------------------------------------------------------------------------------------------------


def test_lgm_big_keys_shapes_and_param_count():
    with torch.device("meta"):
        model = R.LGM("big")
    ref = [line.split("\t") for line in open(KEYS_FILE).read().strip().splitlines()]
    ours = [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]
    assert len(ref) == 376
    assert ours == [tuple(r) for r in ref]
    assert sum(p.numel() for p in model.parameters()) == 415_042_848


def _tiny(seed=0):
    torch.manual_seed(seed)
    return R.LGM("tiny").eval()


def test_lgm_tiny_outputs_and_activations():
    model = _tiny()
    gen = torch.Generator().manual_seed(0)
    views = torch.rand(2, 4, 3, 80, 80, generator=gen)  # resized to 64 inside prepare_inputs
    with torch.no_grad():
        x = model.prepare_inputs(views, R.standard_cameras())
        g = model.reconstruct(views)
    cfg = model.config
    assert x.shape == (2, 4, 9, 64, 64)
    rgb = F.interpolate(views.reshape(8, 3, 80, 80), size=(64, 64), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet
    torch.testing.assert_close(x[:, :, :3], ((rgb - mean[:, None, None]) / std[:, None, None]).reshape(2, 4, 3, 64, 64))
    torch.testing.assert_close(x[0, :, 3:], R.plucker_rays(R.standard_cameras(), cfg.fovy, 64, 64))
    assert g.shape == (2, 4 * 32 * 32, 14) == (2, cfg.num_gaussians, 14)
    assert g[..., :3].abs().max() <= 1 and ((g[..., 3] > 0) & (g[..., 3] < 1)).all()
    assert (g[..., 4:7] > 0).all() and ((g[..., 11:] >= 0) & (g[..., 11:] <= 1)).all()
    torch.testing.assert_close(g[..., 7:11].norm(dim=-1), torch.ones(2, 4096))  # fixrot: per-Gaussian unit
    # objects are independent; views of one object talk to each other through MVAttention
    with torch.no_grad():
        g1 = model.reconstruct(views[:1])
        v2 = views.clone()
        v2[0, 3] = 1 - v2[0, 3]
        g2 = model.reconstruct(v2)
    torch.testing.assert_close(g1[0], g[0], atol=1e-5, rtol=0)
    assert (g2[0, :1024] - g[0, :1024]).abs().max() > 1e-4  # view 0's Gaussians see view 3
    torch.testing.assert_close(g2[1], g[1], atol=1e-5, rtol=0)


def functional_lgm(sd, cfg, x, swap_skips=False):
    # LGM core/unet.py + core/models.py written out with torch.nn.functional on the state dict only (independent of the modules)
    def gn(h, p):
        return F.group_norm(h, cfg.norm_groups, sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def conv(h, p, stride=1):
        w = sd[p + ".weight"]
        return F.conv2d(h, w, sd[p + ".bias"], stride, w.shape[-1] // 2)

    def res(h, p):
        y = conv(F.silu(gn(h, p + ".norm1")), p + ".conv1")
        y = conv(F.silu(gn(y, p + ".norm2")), p + ".conv2")
        return (y + (conv(h, p + ".shortcut") if p + ".shortcut.weight" in sd else h)) * math.sqrt(0.5)

    def attn(h, p):
        if p + ".norm.weight" not in sd:
            return h
        BV, C, Hh, Ww = h.shape
        y = gn(h, p + ".norm").reshape(BV // 4, 4, C, Hh, Ww).permute(0, 1, 3, 4, 2).reshape(BV // 4, -1, C)
        q, k, v = (y @ sd[p + ".attn.qkv.weight"].T).reshape(BV // 4, -1, 3, cfg.num_heads, C // cfg.num_heads).unbind(2)
        a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(C // cfg.num_heads), -1)
        o = torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(BV // 4, -1, C) @ sd[p + ".attn.proj.weight"].T
        o = (o + sd[p + ".attn.proj.bias"]).reshape(BV // 4, 4, Hh, Ww, C).permute(0, 1, 4, 2, 3).reshape(BV, C, Hh, Ww)
        return (o + h) * math.sqrt(0.5)

    L = cfg.layers_per_block
    h = conv(x, "unet.conv_in")
    skips = [h]
    for i in range(len(cfg.down_channels)):
        for j in range(L):
            h = attn(res(h, f"unet.down_blocks.{i}.nets.{j}"), f"unet.down_blocks.{i}.attns.{j}")
            skips.append(h)
        if f"unet.down_blocks.{i}.downsample.weight" in sd:
            h = conv(h, f"unet.down_blocks.{i}.downsample", stride=2)
            skips.append(h)
    h = res(attn(res(h, "unet.mid_block.nets.0"), "unet.mid_block.attns.0"), "unet.mid_block.nets.1")
    if swap_skips:  # negative control: the two deepest skips in the wrong order
        skips[-1], skips[-2] = skips[-2], skips[-1]
    for i in range(len(cfg.up_channels)):
        for j in range(L + 1):
            h = res(torch.cat([h, skips.pop()], 1), f"unet.up_blocks.{i}.nets.{j}")
            h = attn(h, f"unet.up_blocks.{i}.attns.{j}")
        if f"unet.up_blocks.{i}.upsample.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"unet.up_blocks.{i}.upsample")
    h = conv(conv(F.silu(gn(h, "unet.norm_out")), "unet.conv_out"), "conv")
    B, s = x.shape[0] // 4, cfg.splat_size
    h = h.reshape(B, 4, 14, s, s).permute(0, 1, 3, 4, 2).reshape(B, -1, 14)  # Gaussian = view, row, col
    q = h[..., 7:11]
    return torch.cat([h[..., :3].clamp(-1, 1), torch.sigmoid(h[..., 3:4]), 0.1 * F.softplus(h[..., 4:7]),
                      q / q.norm(dim=-1, keepdim=True).clamp(min=1e-12), 0.5 * torch.tanh(h[..., 11:]) + 0.5], -1)


def test_lgm_unet_matches_functional_reference():
    model = _tiny(3).double()
    sd = model.state_dict()
    x = torch.randn(2, 4, 9, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = model.conv(model.unet(x.reshape(8, 9, 64, 64)))
        g = model.forward_gaussians(x)
        ref = functional_lgm(sd, model.config, x.reshape(8, 9, 64, 64))
        swapped = functional_lgm(sd, model.config, x.reshape(8, 9, 64, 64), swap_skips=True)
    assert ours.shape == (8, 14, 32, 32)
    torch.testing.assert_close(g.double(), ref, atol=1e-5, rtol=0)  # head runs in float32
    assert (swapped - ref).abs().max() > 1e-3  # the comparison sees the skip wiring


def test_mv_attention_matches_manual_softmax():
    gen = torch.Generator().manual_seed(0)
    attn = R.MVAttention(16, heads=4, groups=4).double()
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3
    x = torch.randn(2 * 4, 16, 3, 5, generator=gen, dtype=torch.float64)
    y = attn(x)
    # LGM's MVAttention by hand: tokens of all 4 views, view-major, 4 heads of 4 channels
    n = F.group_norm(x, 4, attn.norm.weight, attn.norm.bias, 1e-5)
    expect = torch.empty_like(x)
    for b in range(2):
        tok = n[4 * b:4 * b + 4].permute(0, 2, 3, 1).reshape(-1, 16)  # (4*3*5, 16)
        qkv = tok @ attn.attn.qkv.weight.T
        q, k, v = qkv.split(16, dim=1)
        heads = []
        for h in range(4):
            sl = slice(4 * h, 4 * h + 4)
            heads.append(torch.softmax(q[:, sl] @ k[:, sl].T / 2.0, dim=1) @ v[:, sl])
        o = torch.cat(heads, 1) @ attn.attn.proj.weight.T + attn.attn.proj.bias
        expect[4 * b:4 * b + 4] = o.reshape(4, 3, 5, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, (expect + x) * math.sqrt(0.5), atol=1e-10, rtol=0)


def test_checkpoint_fp16_roundtrip_and_strict_errors(tmp_path):
    from safetensors.torch import save_file
    model = _tiny(1)
    with torch.no_grad():
        for p in model.parameters():  # make the fp32 model exactly representable in fp16
            p.copy_(p.half().float())
    sd16 = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "lgm").mkdir()
    save_file(sd16, str(tmp_path / "lgm" / "model_fp16_fixrot.safetensors"))  # like LGM's file: no metadata
    loaded = R.LGM.from_pretrained(str(tmp_path / "lgm"), config="tiny")
    assert loaded.conv.weight.dtype == torch.float32 and not loaded.training
    views = torch.rand(1, 4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(views), model.reconstruct(views), atol=0, rtol=0)
    assert R.LGM.from_pretrained(str(tmp_path / "lgm"), config="tiny", dtype=torch.bfloat16).conv.weight.dtype == torch.bfloat16
    # a big-config load of this file names the missing/mismatching keys
    with pytest.raises(KeyError, match="unet.down_blocks.4"):
        R.LGM.from_pretrained(str(tmp_path / "lgm" / "model_fp16_fixrot.safetensors"))
    missing = dict(sd16)
    del missing["unet.mid_block.attns.0.attn.proj.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \(1\): unet.mid_block.attns.0.attn.proj.bias"):
        R.LGM.from_pretrained(str(tmp_path / "missing.safetensors"), config="tiny")
    extra = dict(sd16, **{"lpips_loss.net.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(KeyError, match=r"unexpected keys \(1\): lpips_loss.net.weight"):
        R.LGM.from_pretrained(str(tmp_path / "extra.safetensors"), config="tiny")
    bad = dict(sd16, **{"conv.bias": torch.zeros(13, dtype=torch.float16)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match=r"conv.bias: file \(13,\)"):
        R.LGM.from_pretrained(str(tmp_path / "bad.safetensors"), config="tiny")


def test_save_pretrained_recovers_config(tmp_path):
    model = _tiny(2)
    model.save_pretrained(tmp_path / "toy_lgm")
    assert (tmp_path / "toy_lgm" / "config.json").is_file()
    loaded = R.LGM.from_pretrained(tmp_path / "toy_lgm")  # config comes from the file's metadata
    assert loaded.config == R.LGM_CONFIGS["tiny"]
    views = torch.rand(1, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(views), model.reconstruct(views), atol=0, rtol=0)
    with pytest.raises(ValueError, match="config"):
        R.LGM.from_pretrained(tmp_path / "toy_lgm", config="big")


def test_from_pretrained_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        R.LGM.from_pretrained(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="model_fp16_fixrot.safetensors"):
        R.LGM.from_pretrained(str(tmp_path))  # empty directory
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        R.LGM.from_pretrained("carve3d-test/no-such-lgm")
    msg = str(err.value)
    assert "carve3d-test/no-such-lgm" in msg and "model_fp16_fixrot.safetensors" in msg
    assert "hf download carve3d-test/no-such-lgm model_fp16_fixrot.safetensors --local-dir" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one message, no chained traceback


def test_lgm_rejects_bad_input():
    model = _tiny()
    with pytest.raises(ValueError, match="images_with_rays"):
        model.forward_gaussians(torch.zeros(1, 4, 9, 32, 32))
    with pytest.raises(ValueError, match="views"):
        model.prepare_inputs(torch.zeros(1, 3, 3, 64, 64), R.standard_cameras())
    with pytest.raises(ValueError, match="c2w"):
        model.prepare_inputs(torch.zeros(1, 4, 3, 64, 64), R.standard_cameras()[:3])
    with pytest.raises(KeyError, match="huge"):
        R.LGM("huge")
