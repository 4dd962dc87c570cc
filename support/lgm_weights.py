# LGM checkpoint files: find them (local file, folder or Hugging Face hub id), read and write safetensors, and
# check a state dict strictly against the model before loading (never a silent partial load).
#
# Support code for reconstruct.LGM.from_pretrained / save_pretrained. The released weights are
# ashawkey/LGM model_fp16_fixrot.safetensors (376 tensors of LGM big; 3DTopia/LGM readme.md); our toy LGM
# is saved in the same format with its LGMConfig in the safetensors header.
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from support import files

DEFAULT_HUB_ID = "ashawkey/LGM"
# fixrot first: the rotation-normalisation fix of 3DTopia/LGM core/models.py (commit 9a0797cd)
CHECKPOINT_NAMES = ("model_fp16_fixrot.safetensors", "model.safetensors")
CONFIG_KEY = "carve3d_lgm_config"  # where save_checkpoint puts the config in the safetensors header


def read_checkpoint(path_or_hub_id):
    """-> (file, state dict, stored config as a dict or None)."""
    file = resolve_checkpoint(path_or_hub_id)
    fix = (f"copy or download it again: LGM's released weights with "
           f"{_download_hint(DEFAULT_HUB_ID, CHECKPOINT_NAMES[0], 'checkpoints/lgm')}, the shipped toy LGM with "
           f"`git checkout -- checkpoints/toy` (or retrain it: `python -m toy.sft lgm --out FILE`)")
    expected = "LGM weights (safetensors, as LGM's release and save_pretrained write them)"
    with files.read_or_explain(file, expected, fix), \
            safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
        stored = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    return file, state, stored


def write_checkpoint(state, config_dict, path):
    # path: a directory (writes model.safetensors + config.json) or a *.safetensors file (+ sibling .json)
    path = Path(path)
    if path.suffix == ".safetensors":
        file, cfg_file = path, path.with_suffix(".json")
    else:
        file, cfg_file = path / "model.safetensors", path / "config.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(config_dict)
    sd = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(sd, str(file), metadata={"format": "pt", CONFIG_KEY: cfg_json})
    cfg_file.write_text(cfg_json + "\n")
    return file


def check_state_dict(model, state, file):
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


def resolve_checkpoint(path_or_hub_id):
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
        from huggingface_hub import hf_hub_download  # optional: only for hub ids
        return Path(hf_hub_download(repo_id=s, filename=fname))
    except Exception as e:  # offline, no such repo, no access: one actionable message, no chained traceback
        raise FileNotFoundError(
            f"LGM.from_pretrained: {s!r} is not a local file or directory, and {fname!r} could not be fetched "
            f"from the Hugging Face Hub repo {s!r} ({type(e).__name__}; offline?). On a machine with internet "
            f"access run {_download_hint(s, fname, 'checkpoints/lgm')}, copy checkpoints/lgm/ into the "
            f"working directory and call LGM.from_pretrained('checkpoints/lgm')") from None
