# Where MVDream's weights come from and how they become diffusers / transformers modules: the conversion of
# the original LDM checkpoint, the diffusers port's folder, Hugging Face hub downloads, the tokenizers, LoRA
# files in diffusers' format, and our own saved (toy) policies.
#
# Support code for mvdream.MVDreamPolicy's constructors and savers; a reader of the method can skip it.
# Layouts: (a) bytedance/MVDream's sd-v2.1-base-4view.pt (mvdream/model_zoo.py): model.diffusion_model.* (UNet,
# LDM names, 690 tensors incl. camera_embed.*), first_stage_model.* (VAE), cond_stage_model.model.* (OpenCLIP
# text tower), 12 schedule buffers; (b) ashawkey/mvdream-sd2.1-diffusers (converted by ashawkey/mvdream_diffusers
# convert_mvdream_to_diffusers.py): the same UNet names without the prefix, plus diffusers vae/ text_encoder/
# tokenizer/ folders. We convert with diffusers' own LDM converters (diffusers/loaders/single_file_utils.py).
import json
import re
import zipfile
import zlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from support import files

# SD 2.1 text encoder as diffusers converts OpenCLIP ViT-H/14: 23 of 24 layers, the "penultimate layer"
# (MVDream mvdream/configs/sd-v2-base.yaml: FrozenOpenCLIPEmbedder, layer "penultimate").
SD21_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
# SD 2.1 VAE, latent scale 0.18215 (MVDream mvdream/configs/sd-v2-base.yaml).
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu", norm_num_groups=32, scaling_factor=0.18215,
)


# ---------------------------------------------------------------------------------------------------
# Tokenizers that need no files.
#
# WordTokenizer: the toy world's closed vocabulary. Lowercase, words = runs of letters/digits (punctuation
# and spaces separate words and are dropped), [BOS] words [EOS] then [PAD] up to max_length. An unknown word
# or a prompt that does not fit is an error (no silent <unk>, no silent truncation).
class WordTokenizer:
    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, vocab, max_length=16):
        words = [w.lower() for w in vocab]
        bad = [w for w in words if not re.fullmatch(r"[a-z0-9]+", w)]
        if bad:
            raise ValueError(f"WordTokenizer: vocab entries must be single lowercase words, got {bad}")
        if len(set(words)) != len(words):
            raise ValueError("WordTokenizer: vocab has duplicate words")
        self.vocab = words
        self.ids = {w: i + 3 for i, w in enumerate(words)}
        self.vocab_size = len(words) + 3
        self.max_length = max_length

    def __call__(self, prompts):
        rows = []
        for p in prompts:
            words = re.findall(r"[a-z0-9]+", p.lower())
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise KeyError(f"WordTokenizer: word(s) {unknown} in prompt {p!r} are not in the vocabulary; "
                               f"known words: {self.vocab}")
            if len(words) + 2 > self.max_length:
                raise ValueError(f"WordTokenizer: prompt {p!r} has {len(words)} words; at most "
                                 f"{self.max_length - 2} fit in max_length={self.max_length}")
            ids = [self.BOS] + [self.ids[w] for w in words] + [self.EOS]
            rows.append(ids + [self.PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# HashTokenizer: only for random_init (benchmarks) when SD 2.1's CLIPTokenizer files are absent. Random
# weights have no vocabulary anyway; words map to fixed pseudo-random ids (crc32) so the full-size text
# encoder still runs at full cost on 77 tokens. Never used for real weights.
class HashTokenizer:
    def __init__(self, vocab_size=49408, max_length=77, bos=49406, eos=49407, pad=0):
        self.vocab_size, self.max_length, self.bos, self.eos, self.pad = vocab_size, max_length, bos, eos, pad

    def __call__(self, prompts):
        rows = []
        for p in prompts:
            words = re.findall(r"[a-z0-9]+", p.lower())[: self.max_length - 2]
            ids = [self.bos] + [1 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words] + [self.eos]
            rows.append(ids + [self.pad] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Checkpoint conversion (layouts (a) and (b) above).
# UNet: rename camera_embed.{0,2} -> label_emb.0.{0,2} so diffusers' convert_ldm_unet_checkpoint maps it to
# class_embedding.linear_{1,2}; VAE: convert_ldm_vae_checkpoint; text: convert_open_clip_checkpoint (drops
# resblocks.23 = the "penultimate layer" choice). diffusers' converters silently skip keys they do not
# know, so every source tensor is accounted for and every result is checked against the target model's
# keys and shapes: a partial checkpoint is an error, never a silent partial load.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
LDM_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                        "posterior_mean_coef1", "posterior_mean_coef2")
LDM_UNET_TOP = ("time_embed.", "camera_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.")
_OPENCLIP_TEXT_KEY = re.compile(
    r"(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale"
    r"|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))")


def _few(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_matches(converted, model, part):
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    shapes = [f"{k}: {tuple(converted[k].shape)} vs {expected[k]}" for k in set(expected) & set(converted)
              if tuple(converted[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise KeyError(f"convert_mvdream_checkpoint: the {part} does not match the target model: "
                       f"missing [{_few(missing)}]; unexpected [{_few(unexpected)}]; shape mismatches {shapes[:5]}. "
                       "Is this the MVDream sd-v2.1-base-4view checkpoint (or pass the matching unet_config)?")


def _check_consumed(source, converted, part):
    # diffusers' converters copy (or slice views of) the source tensors; a source tensor that reaches no
    # output was skipped. Compare by identity of the underlying tensor.
    def root(t):
        return t._base if t._base is not None else t
    used = {id(root(v)) for v in converted.values()}
    dropped = [k for k, v in source.items() if id(root(v)) not in used]
    if dropped:
        raise KeyError(f"convert_mvdream_checkpoint: {part} keys not understood by the converter: [{_few(dropped)}]")


def on_meta(build):
    with torch.device("meta"):
        return build()


def _convert_unet(unet_sd, kwargs):
    for k in ("camera_embed.0.weight", "camera_embed.0.bias", "camera_embed.2.weight", "camera_embed.2.bias"):
        if k not in unet_sd:
            raise KeyError(f"convert_mvdream_checkpoint: UNet key {k!r} missing: MVDream's camera MLP (camera_embed) "
                           "is not in this checkpoint (a plain SD UNet?)")
    def rename(k):
        k = k.replace("camera_embed.0.", "label_emb.0.0.").replace("camera_embed.2.", "label_emb.0.2.")
        return LDM_UNET_PREFIX + k
    renamed = {rename(k): v for k, v in unet_sd.items()}
    out = convert_ldm_unet_checkpoint(renamed, {"layers_per_block": kwargs["layers_per_block"],
                                                "class_embed_type": "projection"})
    _check_matches(out, on_meta(lambda: UNet2DConditionModel(**kwargs)), "UNet")
    _check_consumed(unet_sd, out, "UNet")
    return out


def _convert_vae(vae_sd_prefixed):
    out = convert_ldm_vae_checkpoint(vae_sd_prefixed, SD21_VAE_CONFIG)
    _check_matches(out, on_meta(lambda: AutoencoderKL(**SD21_VAE_CONFIG)), "VAE")
    _check_consumed(vae_sd_prefixed, out, "VAE")
    return out


def _convert_text(text_sd_prefixed):
    unknown = [k for k in text_sd_prefixed if not _OPENCLIP_TEXT_KEY.fullmatch(k[len(OPENCLIP_PREFIX):])]
    if unknown:
        raise KeyError(f"convert_mvdream_checkpoint: OpenCLIP text keys not understood: [{_few(unknown)}]")
    model = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG)))
    out = convert_open_clip_checkpoint(model, text_sd_prefixed, prefix=OPENCLIP_PREFIX)
    out.pop("text_projection.weight", None)  # CLIP's projection head: CLIPTextModel has none (unused by SD)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers >= 5 dropped the "text_model." level inside CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    _check_matches(out, model, "text encoder")
    return out


def convert_mvdream_checkpoint(state_dict, unet_kwargs):
    keys = list(state_dict)
    if any(k.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, OPENCLIP_PREFIX)) for k in keys):  # (a) original .pt
        parts = {p: {k: state_dict[k] for k in keys if k.startswith(p)}
                 for p in (LDM_UNET_PREFIX, LDM_VAE_PREFIX, OPENCLIP_PREFIX)}
        other = [k for k in keys if not k.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, OPENCLIP_PREFIX))
                 and k not in LDM_SCHEDULE_BUFFERS]
        if other:
            raise KeyError(f"convert_mvdream_checkpoint: keys outside model.diffusion_model. / first_stage_model. / "
                           f"cond_stage_model.model. / the 12 schedule buffers: [{_few(other)}]")
        unet_sd = {k[len(LDM_UNET_PREFIX):]: v for k, v in parts[LDM_UNET_PREFIX].items()}
    elif keys and all(k.startswith(LDM_UNET_TOP) for k in keys):  # (b) diffusers-port unet weights
        parts, unet_sd = {LDM_VAE_PREFIX: {}, OPENCLIP_PREFIX: {}}, dict(state_dict)
    else:
        raise KeyError(f"convert_mvdream_checkpoint: unrecognised layout (first keys: {keys[:3]}); expected the "
                       "original MVDream .pt (model.diffusion_model.*, ...) or the diffusers-port unet weights "
                       "(input_blocks.*, camera_embed.*, ...)")
    out = {}
    if unet_sd:
        out["unet"] = _convert_unet(unet_sd, unet_kwargs)
    if parts[LDM_VAE_PREFIX]:
        out["vae"] = _convert_vae(parts[LDM_VAE_PREFIX])
    if parts[OPENCLIP_PREFIX]:
        out["text_encoder"] = _convert_text(parts[OPENCLIP_PREFIX])
    return out


def load_strict(model, state_dict, what):
    # assign=True: a meta-device model takes the checkpoint tensors as they are (no random init, no copy).
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"{what}: tensors left uninitialised after loading: {_few(left)}")
    return model


# ---------------------------------------------------------------------------------------------------
# Where the paper-setup weights come from (hub ids, or local copies of them).
ORIGINAL_REPO, ORIGINAL_FILE = "MVDream/MVDream", "sd-v2.1-base-4view.pt"
PORT_REPO = "ashawkey/mvdream-sd2.1-diffusers"
SD21_REPO = "stabilityai/stable-diffusion-2-1-base"  # source of the CLIPTokenizer that the port copied
_PORT_PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
_WHAT_TO_DOWNLOAD = (
    f"Download either (a) {ORIGINAL_REPO}/{ORIGINAL_FILE} plus a CLIPTokenizer folder (tokenizer/ of {PORT_REPO} "
    f"or of {SD21_REPO}), or (b) the folder {PORT_REPO} (unet/ vae/ text_encoder/ tokenizer/ scheduler/), e.g. "
    f"`huggingface-cli download {PORT_REPO} --local-dir weights/mvdream` on a machine with internet, copy it "
    "here and pass that path (or put it in the Hugging Face cache).")
_DOWNLOAD_AGAIN = "download it again (a copy in the Hugging Face cache: delete that copy first). " + _WHAT_TO_DOWNLOAD


def _hub_file(repo, filename, local_files_only):
    from huggingface_hub import hf_hub_download  # optional: only for hub ids
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_files_only))
    except Exception as e:  # offline, missing, gated: all mean "not here"
        raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: cannot get {repo}/{filename} ({type(e).__name__}). "
                                + _WHAT_TO_DOWNLOAD) from None


def _hub_folder(repo, local_files_only, patterns=_PORT_PATTERNS):
    from huggingface_hub import snapshot_download  # optional: only for hub ids
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_files_only))
    except Exception as e:
        raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: cannot get {repo} ({type(e).__name__}). "
                                + _WHAT_TO_DOWNLOAD) from None


def _load_clip_tokenizer(tokenizer, local_files_only):
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: tokenizer folder {tokenizer} does not exist. "
                                    + _WHAT_TO_DOWNLOAD)
        with files.read_or_explain(tokenizer, "a CLIPTokenizer folder", _DOWNLOAD_AGAIN):
            return CLIPTokenizer.from_pretrained(tokenizer)
    for repo in (PORT_REPO, SD21_REPO):
        try:
            return CLIPTokenizer.from_pretrained(_hub_folder(repo, local_files_only, ["tokenizer/*"]) / "tokenizer")
        except (FileNotFoundError, OSError):
            continue
    raise FileNotFoundError("MVDreamPolicy.from_pretrained: the original checkpoint has no tokenizer and no SD 2.1 "
                            "CLIPTokenizer was found; pass tokenizer=<folder>. " + _WHAT_TO_DOWNLOAD)


def _from_pretrained_strict(model_class, folder, fix=_DOWNLOAD_AGAIN):
    # diffusers/transformers only warn about missing or unexpected keys; here that is an error.
    expected = f"a {model_class.__name__} folder (config.json and weights, as save_pretrained writes it)"
    if not Path(folder).is_dir():
        raise files.MissingFileError(folder, expected, "there is no such folder", fix)
    with files.read_or_explain(folder, expected, fix):
        model, info = model_class.from_pretrained(folder, output_loading_info=True)
    bad = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise KeyError(f"MVDreamPolicy.from_pretrained: {folder} does not match {model_class.__name__}: {bad}")
    return model


def read_vae(folder):
    """A toy VAE folder (toy/sft.py vae: config.json + diffusion_pytorch_model.safetensors) -> AutoencoderKL."""
    fix = ("copy the folder again (the shipped one: `git checkout -- checkpoints/toy/vae-tiny`), or retrain it with "
           "`python -m toy.sft vae --out DIR`")
    return _from_pretrained_strict(AutoencoderKL, folder, fix)


def _read_weights(path):
    path = Path(path)
    with files.read_or_explain(path, "MVDream's weights (a safetensors file or a torch checkpoint)", _DOWNLOAD_AGAIN):
        if path.suffix == ".safetensors":
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))  # mmap: no 2nd copy
    return sd.get("state_dict", sd)


def load_paper_parts(path_or_hub_id, tokenizer, local_files_only, unet_kwargs):
    """-> (path, parts): parts is None for our own saved folder (mvdream_config.json), else the converted UNet
    state dict and the loaded VAE, text encoder and tokenizer of the original .pt or the diffusers port."""
    path = Path(path_or_hub_id)
    if not path.exists():
        if path_or_hub_id == ORIGINAL_REPO:
            path = _hub_file(ORIGINAL_REPO, ORIGINAL_FILE, local_files_only)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_hub_id)):
            path = _hub_folder(str(path_or_hub_id), local_files_only)
        else:
            raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: {path_or_hub_id} is neither a local path "
                                    "nor a hub id. " + _WHAT_TO_DOWNLOAD)
    if (path / SAVED_CONFIG).exists():
        return path, None
    if path.is_dir():
        return path, _port_folder_parts(path, tokenizer, unet_kwargs)
    return path, _original_parts(path, tokenizer, local_files_only, unet_kwargs)


def _original_parts(path, tokenizer, local_files_only, unet_kwargs):
    parts = convert_mvdream_checkpoint(_read_weights(path), unet_kwargs)
    missing = [p for p in ("unet", "vae", "text_encoder") if p not in parts]
    if missing:
        raise KeyError(f"MVDreamPolicy.from_pretrained: {path} lacks the {missing} part(s) of MVDream")
    vae = load_strict(on_meta(lambda: AutoencoderKL(**SD21_VAE_CONFIG)), parts["vae"], "VAE")
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))  # not meta: position_ids is a buffer
    text_encoder.load_state_dict(parts["text_encoder"], strict=True)
    return {"unet": parts["unet"], "vae": vae, "text_encoder": text_encoder,
            "tokenizer": _load_clip_tokenizer(tokenizer, local_files_only)}


def _port_folder_parts(path, tokenizer, unet_kwargs):
    need = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    weights = sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")) or \
        sorted((path / "unet").glob("diffusion_pytorch_model*.bin"))
    if need or not weights:
        raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: {path} is not an MVDream diffusers-port folder "
                                f"(missing {need or 'unet/diffusion_pytorch_model.safetensors'}). "
                                + _WHAT_TO_DOWNLOAD)
    # The port's scheduler/ holds the same DDIM config as mvdream.make_scheduler(); we use ours.
    return {"unet": convert_mvdream_checkpoint(_read_weights(weights[0]), unet_kwargs)["unet"],
            "vae": _from_pretrained_strict(AutoencoderKL, path / "vae"),
            "text_encoder": _from_pretrained_strict(CLIPTextModel, path / "text_encoder"),
            "tokenizer": _load_clip_tokenizer(tokenizer or path / "tokenizer", True)}


# ---------------------------------------------------------------------------------------------------
# Our own saved policies (toy world): model.safetensors + mvdream_config.json (config incl. vocab), and the
# LoRA in diffusers' file next to them.
SAVED_CONFIG, SAVED_WEIGHTS = "mvdream_config.json", "model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, so load_lora_weights(dir) finds it
_SAVED_FIX = ("copy the folder again (a shipped one: `git checkout -- checkpoints/toy`), or retrain it with "
              "`python -m toy.sft mvdream --out DIR`")
LORA_EXPECTED = "LoRA weights in diffusers' safetensors format (as train.py and MVDreamPolicy.save_lora write)"
_LORA_FIX = ("copy it again from the run that wrote it (train.py: run_dir/checkpoints/epoch_NNNN or best/), or pass "
             "another checkpoint's LoRA")


def write_saved_policy(directory, base_state, config):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in base_state.items()}, directory / SAVED_WEIGHTS)
    (directory / SAVED_CONFIG).write_text(json.dumps(config, indent=1))


def read_saved_config(path):
    return files.read_json(Path(path) / SAVED_CONFIG, "the config of a saved MVDream policy (JSON)", _SAVED_FIX)


def load_saved_weights(policy, path):
    file = Path(path) / SAVED_WEIGHTS
    with files.read_or_explain(file, "the weights of a saved MVDream policy (safetensors)", _SAVED_FIX):
        state = load_file(file)
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:  # torch lists the missing/unexpected keys; say which file and why
        raise KeyError(f"MVDreamPolicy.from_pretrained: {file} does not match its "
                       f"{SAVED_CONFIG} (a strict load found): {e}") from None


def write_lora(directory, peft_state, lora_config):
    # diffusers' own writer: safetensors + the LoraConfig in the header (so alpha travels with the file).
    sd = {k: v.detach().cpu().contiguous() for k, v in peft_state.items()}
    meta = {k: v for k, v in lora_config.to_dict().items() if k in ("r", "lora_alpha", "target_modules")}
    meta["target_modules"] = sorted(meta["target_modules"])  # peft keeps a set: its order varies by process
    StableDiffusionLoraLoaderMixin.save_lora_weights(directory, unet_lora_layers=sd, weight_name=LORA_FILE,
                                                     unet_lora_adapter_metadata=meta)
    return Path(directory) / LORA_FILE


def read_lora(path_or_state_dict):
    """A LoRA file (or folder holding one) or state dict in lora_state_dict's format -> (peft keys without the
    'unet.' prefix, metadata from the file header such as lora_alpha)."""
    metadata = {}
    if isinstance(path_or_state_dict, dict):
        sd = dict(path_or_state_dict)
    else:
        path = Path(path_or_state_dict)
        path = path / LORA_FILE if path.is_dir() else path
        if not path.exists():
            raise files.MissingFileError(path, LORA_EXPECTED, "it does not exist (load_lora)", _LORA_FIX)
        # a train.py checkpoint's LoRA is checked against its manifest (a flipped bit loads without any error)
        files.check_manifest(path.parent, _LORA_FIX, names={path.name}, expected={path.name: LORA_EXPECTED})
        with files.read_or_explain(path, LORA_EXPECTED, _LORA_FIX), safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            header = (f.metadata() or {}).get("lora_adapter_metadata")
            metadata = {k.removeprefix("unet."): v for k, v in json.loads(header or "{}").items()}
    foreign = [k for k in sd if not k.startswith("unet.")]
    if foreign:
        raise KeyError(f"load_lora: expected only 'unet.'-prefixed peft keys (lora_state_dict's format), "
                       f"got [{_few(foreign)}]")
    return {k.removeprefix("unet."): v for k, v in sd.items()}, metadata


def check_lora_keys(expected, got):
    expected = {k: tuple(v.shape) for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in got.items()}
    if expected != got:
        bad = [k for k in set(expected) & set(got) if expected[k] != got[k]]
        raise KeyError(f"load_lora: adapter keys do not match: missing [{_few(set(expected) - set(got))}]; "
                       f"unexpected [{_few(set(got) - set(expected))}]; shape mismatches [{_few(bad)}]")
