# 3D Gaussian splatting .ply files, so a reconstruction can be opened in any 3DGS viewer. Support code (the file
# format only): `write_ply(path, gaussians)` and `read_ply(path)` convert between our activated (N, 14) layout
# [xyz, opacity, scale(3), rotation (w, x, y, z), rgb] and the file's stored (pre-activation) values.
#
# Layout: Inria's, as graphdeco-inria/gaussian-splatting scene/gaussian_model.py writes it (save_ply,
# construct_list_of_attributes): one binary little-endian "vertex" element whose properties are all float32,
#   x y z nx ny nz f_dc_0..2 f_rest_0..44 opacity scale_0..2 rot_0..3
# and the viewer applies the activations of that file's GaussianModel: sigmoid(opacity), exp(scale),
# normalize(rot), colour = 0.5 + C0 * f_dc. LGM's save_ply (3DTopia/LGM core/gs.py, compatible=True) stores the same
# encoding but writes only x y z f_dc_* opacity scale_* rot_*; we add the zero normals and the zero degree-3
# f_rest_* so that viewers which expect Inria's exact layout (SIBR) accept the file. LGM stores log(scale + 1e-8);
# we store log(scale) (our scales are > 0), so that read_ply(write_ply(g)) returns g to float32 precision.
# Coordinates are written as they are, in LGM's OpenGL world (y up), as LGM's save_ply does.
import os

import numpy as np
import torch

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonic constant 1 / (2 sqrt(pi)) (Inria utils/sh_utils.py)
NUM_F_REST = 45  # degree 3: (4^2 - 1) coefficients x 3 colour channels, all zero (view-independent colour)
MIN_OPACITY = 0.005  # LGM core/gs.py save_ply prunes opacity < 0.005 (and our toy padding has opacity exactly 0)
# float32 opacity from a sigmoid can be exactly 1.0, whose logit is +inf: store at most the logit of 1 - 2^-24 (the
# float32 just below 1), which reads back within 6e-8 of 1
MAX_OPACITY = 1.0 - 2.0 ** -24

PROPERTIES = (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
              + [f"f_rest_{i}" for i in range(NUM_F_REST)] + ["opacity"]
              + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])
# what read_ply needs: normals and f_rest_* are optional (LGM's files have neither)
REQUIRED = [p for p in PROPERTIES if not p.startswith(("nx", "ny", "nz", "f_rest_"))]

# PLY scalar types (Paul Bourke's PLY format description) -> numpy little-endian dtypes
PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "<i2", "ushort": "<u2", "int": "<i4", "uint": "<u4",
             "float": "<f4", "double": "<f8", "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2",
             "int32": "<i4", "uint32": "<u4", "float32": "<f4", "float64": "<f8"}


def write_ply(path, gaussians):
    """One object's Gaussians (N, 14), activated, -> a 3DGS .ply at `path`. Returns the number written."""
    g = torch.as_tensor(gaussians).detach().cpu()
    if g.dim() != 2 or g.shape[1] != 14:
        raise ValueError(f"write_ply({path}): gaussians must be ONE object (N, 14) [xyz, opacity, scale(3), "
                         f"rotation wxyz, rgb]; got {tuple(g.shape)} (index a batch: gaussians[0])")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"write_ply({path}): gaussians contain NaN or inf")
    # prune as LGM's save_ply does, compared in the input's precision as there (float32 0.005 is kept); the logit
    # of the toy padding's opacity 0 would be -inf. The encoding is computed in float64, stored as float32.
    g = g[g[:, 3] >= MIN_OPACITY].double()
    xyz, opacity, scale, quat, rgb = g.split([3, 1, 3, 4, 3], dim=1)
    if bool((scale <= 0).any()):
        raise ValueError(f"write_ply({path}): scales must be > 0 (they are stored as log); got min "
                         f"{scale.min().item():.3g}")
    qnorm = quat.norm(dim=1, keepdim=True)
    if bool((qnorm == 0).any()):
        raise ValueError(f"write_ply({path}): a kept Gaussian has the zero quaternion (no rotation defined)")
    opacity = opacity.clamp(max=MAX_OPACITY)
    stored = torch.cat([xyz, torch.zeros_like(xyz), (rgb - 0.5) / SH_C0, g.new_zeros(len(g), NUM_F_REST),
                        torch.log(opacity / (1.0 - opacity)), torch.log(scale), quat / qnorm], dim=1)
    body = np.ascontiguousarray(stored.numpy().astype("<f4"))  # (N, 62) rows = vertices, in PROPERTIES order
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(body)}"]
    header += [f"property float {name}" for name in PROPERTIES] + ["end_header"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(body.tobytes())
    return len(body)


def _parse_header(path, data):
    # -> (elements [(name, count, [(property, numpy dtype)])], byte offset of the body)
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"read_ply: {path} is not a PLY file (it must start with 'ply' and have 'end_header')")
    body_start = data.index(b"\n", end) + 1
    elements = []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if words[1:2] != ["binary_little_endian"]:
                raise ValueError(f"read_ply: {path} is '{line.strip()}'; only binary_little_endian is supported "
                                 "(what Inria's and LGM's save_ply write)")
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if len(words) != 3 or words[1] not in PLY_TYPES or not elements:
                raise ValueError(f"read_ply: {path}: unsupported header line '{line.strip()}' (expected "
                                 f"'property <scalar type> <name>' inside an element; list properties are not "
                                 f"part of a Gaussian .ply)")
            elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
    return elements, body_start


def read_ply(path):
    """A 3DGS .ply (ours, Inria's or LGM's) -> the activated (N, 14) float32 tensor; degree > 0 SH are ignored."""
    with open(path, "rb") as f:
        data = f.read()
    elements, offset = _parse_header(path, data)
    for name, count, props in elements:
        dtype = np.dtype(props)
        if name == "vertex":
            break
        offset += count * dtype.itemsize  # skip elements stored before the vertices
    else:
        raise ValueError(f"read_ply: {path} has no 'element vertex' in its header")
    missing = [p for p in REQUIRED if p not in dtype.names]
    if missing:
        raise ValueError(f"read_ply: {path} lacks the 3DGS vertex properties {missing}; a Gaussian .ply needs "
                         f"{REQUIRED} (Inria's gaussian_model.py save_ply layout)")
    if len(data) < offset + count * dtype.itemsize:
        raise ValueError(f"read_ply: {path} is truncated: {count} vertices of {dtype.itemsize} bytes need "
                         f"{count * dtype.itemsize} bytes after the header, the file has {len(data) - offset}")
    vertices = np.frombuffer(data, dtype=dtype, count=count, offset=offset)

    def columns(*names):
        return torch.from_numpy(np.stack([vertices[n].astype(np.float64) for n in names], axis=1))

    # the activations of Inria's GaussianModel (get_opacity, get_scaling, get_rotation); colour = SH degree 0 only,
    # clamped to our [0, 1] layout (files written by write_ply are already inside it)
    quat = columns("rot_0", "rot_1", "rot_2", "rot_3")
    return torch.cat([columns("x", "y", "z"),
                      torch.sigmoid(columns("opacity")),
                      torch.exp(columns("scale_0", "scale_1", "scale_2")),
                      quat / quat.norm(dim=1, keepdim=True).clamp(min=1e-12),
                      (0.5 + SH_C0 * columns("f_dc_0", "f_dc_1", "f_dc_2")).clamp(0.0, 1.0)], dim=1).float()
