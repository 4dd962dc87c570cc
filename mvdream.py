# MVDream (sd-v2.1-base-4view) as the Carve3D policy: a multi-view text-to-image diffusion model whose
# 4 views of one object attend to each other (spec Part A; Carve3D Sec. 4 finetunes exactly this model).
#
# Built from stock parts so that the official weights load strictly and LoRA/peft just works:
#   * the UNet is diffusers' UNet2DConditionModel (the SD 2.1-base config of spec A.6) whose camera MLP is
#     diffusers' "projection" class embedding and whose self-attentions use our multi-view processor (A.3);
#   * checkpoints are converted with diffusers' own LDM converters (single_file_utils) after one rename;
#   * text encoder = transformers' CLIPTextModel (23 layers = OpenCLIP ViT-H "penultimate", spec A.5).
# The toy world uses the same classes at toy size, in pixel space (see `tiny`).
#
# This file imports nothing from the project (brief: imports between files).
import contextlib
import json
import math
import os
import re
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel

# ---------------------------------------------------------------------------------------------------
# A.1 / A.6  UNet configurations
#
# "sd21-4view": SD 2.1-base UNet + camera MLP, exactly spec A.6 (867,572,164 params, 690 tensors).
# SD2 naming quirk: `attention_head_dim` is really the number of heads (64-dim heads everywhere).
#
# "tiny": the toy world's model. It works in pixel space: a 64x64x3 image in [-1,1] is pixel-unshuffled
# (space-to-depth, factor 2) into a 12x32x32 "latent" (lossless), so the UNet runs at 32x32 like the real
# one runs on 4x32x32 VAE latents. Sized for a hard CPU budget: one CFG forward for 8 prompts x 4 views
# (batch 64) <= ~110 ms on a 2-core CPU. Half of that time goes to the convolutions at 32x32 (thin
# channel counts run far below peak), so the two top levels are thin (16 ch) and the width sits at 8x8 and
# 4x4 (48, 64 ch), which carry the attention (multi-view + text; 4 views x 64 tokens at 8x8 are cheap).
# Head dim 16. Measured in one run (batch 64, no grad, 2 threads): this config 100 ms; widths
# (16,24,48,64) 120 ms; (32,48,64) with attention at 8x8 only 241 ms. bench/sample.py times the policy.
UNET_CONFIGS = {
    "sd21-4view": dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        class_embed_type="projection", projection_class_embeddings_input_dim=16,
    ),
    "tiny": dict(
        sample_size=32, in_channels=12, out_channels=12, layers_per_block=1,
        block_out_channels=(16, 16, 48, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 1, 3, 4), use_linear_projection=True,
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=8, norm_eps=1e-5, act_fn="silu",
        class_embed_type="projection", projection_class_embeddings_input_dim=16,
    ),
}

# SD 2.1 text encoder as diffusers converts OpenCLIP ViT-H/14: 23 of 24 layers (spec A.5).
SD21_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
# SD 2.1 VAE (spec A.6), latent scale 0.18215 (spec A.5).
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu", norm_num_groups=32, scaling_factor=0.18215,
)


def tiny_text_config(vocab_size, max_length):
    # 2 layers, width 64 = the tiny UNet's cross_attention_dim.
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_length, hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------------
# A.3  Multi-view ("3D") self-attention
#
# The batch holds the F views of each object contiguously (index = object * F + view). For self-attention
# the tokens (N*F, L, C) are regrouped to (N, F*L, C) so every token attends to all views of its object
# (view-major order); text cross-attention stays per view. No residual here: the transformer block adds
# it. q/k/v/out go through attn.to_q/... so LoRA layers injected by peft into those Linears apply.
# F is stored on the processor (not passed as cross_attention_kwargs, which diffusers would warn about).
class MultiViewAttnProcessor:
    def __init__(self, num_frames=4):
        self.num_frames = num_frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor: attention_mask is not supported (MVDream uses none)")
        BF, L, C = hidden_states.shape
        frames = self.num_frames if encoder_hidden_states is None else 1
        if BF % frames:
            raise ValueError(f"MultiViewAttnProcessor: batch {BF} is not a multiple of num_frames={frames}; "
                             "the batch must hold whole objects with their views contiguous")
        x = hidden_states.reshape(BF // frames, frames * L, C)
        context = x if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        return out.reshape(BF, L, -1)


def _unet_kwargs(config):
    if isinstance(config, str):
        if config not in UNET_CONFIGS:
            raise ValueError(f"mvdream_unet: unknown config {config!r}; choose one of {list(UNET_CONFIGS)} "
                             "or pass a dict of UNet2DConditionModel arguments")
        return dict(UNET_CONFIGS[config])
    return dict(config)


def mvdream_unet(config, num_frames=4):
    kwargs = _unet_kwargs(config)
    if kwargs.get("class_embed_type") != "projection" or kwargs.get("projection_class_embeddings_input_dim") != 16:
        raise ValueError("mvdream_unet: config needs class_embed_type='projection' and "
                         "projection_class_embeddings_input_dim=16 (the camera MLP, spec A.2)")
    unet = UNet2DConditionModel(**kwargs)
    # attn1 = self-attention of every transformer block (16 in the full model, incl. the mid block).
    unet.set_attn_processor({name: MultiViewAttnProcessor(num_frames) if name.endswith("attn1.processor")
                             else AttnProcessor2_0() for name in unet.attn_processors})
    return unet


# ---------------------------------------------------------------------------------------------------
# A.4  Cameras
#
# One 16-vector per view: MVDream's camera-to-world matrix (radius 1, looking at the origin) with the world
# changed from OpenGL (y up) to "blender" (z up), flattened row-major. Elevation is in MVDream's convention
# (positive = camera ABOVE the object). The paper setup uses elevation 0: that is what LGM's text-to-3D app
# feeds MVDream (spec A.4 table, B.7); MVDream's own scripts default to 15 (the toy world uses 15).
# View order vs LGM: LGM input view k <- MVDream view reconstruct.MVDREAM_TO_LGM[k] = (1, 2, 3, 0)[k]
# (spec B.7); that mapping lives in reconstruct.py, not here.
def get_camera(num_frames=4, elevation=0.0, azimuth_start=0.0, azimuth_span=360.0, blender_coord=True):
    cams = []
    e = math.radians(elevation)
    for k in range(num_frames):
        a = math.radians(azimuth_start + k * azimuth_span / num_frames)
        pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)], dtype=torch.float64)
        forward = -pos / pos.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        right = right / right.norm()
        up = torch.linalg.cross(right, forward)
        up = up / up.norm()
        c2w = torch.eye(4, dtype=torch.float64)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, pos  # OpenGL camera axes
        if blender_coord:  # world (x, y, z)_gl -> (x, -z, y)_blender; camera axes stay OpenGL
            to_blender = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
            c2w = to_blender @ c2w
        cams.append(c2w.flatten())
    return torch.stack(cams).float()


# ---------------------------------------------------------------------------------------------------
# A.5  Noise schedule: MVDream was trained with SD's schedule (1000 steps, scaled_linear 0.00085 -> 0.012,
# epsilon prediction). This DDIMScheduler config is exactly what the diffusers port writes; the step
# spacing caveat (S = 30) is documented in sample.py where S is chosen.
def make_scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
                         timestep_spacing="leading")


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
# A.6  Checkpoint conversion
#
# (a) original MVDream .pt: model.diffusion_model.* (UNet, LDM names, 690 tensors incl. camera_embed.*),
#     first_stage_model.* (VAE), cond_stage_model.model.* (OpenCLIP text tower), 12 schedule buffers;
# (b) diffusers-port unet safetensors: the same UNet names without the model.diffusion_model. prefix.
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


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _convert_unet(unet_sd, unet_config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    for k in ("camera_embed.0.weight", "camera_embed.0.bias", "camera_embed.2.weight", "camera_embed.2.bias"):
        if k not in unet_sd:
            raise KeyError(f"convert_mvdream_checkpoint: UNet key {k!r} missing: MVDream's camera MLP (spec A.2) "
                           "is not in this checkpoint (a plain SD UNet?)")
    def rename(k):
        k = k.replace("camera_embed.0.", "label_emb.0.0.").replace("camera_embed.2.", "label_emb.0.2.")
        return LDM_UNET_PREFIX + k
    renamed = {rename(k): v for k, v in unet_sd.items()}
    kwargs = _unet_kwargs(unet_config)
    out = convert_ldm_unet_checkpoint(renamed, {"layers_per_block": kwargs["layers_per_block"],
                                                "class_embed_type": "projection"})
    _check_matches(out, _on_meta(lambda: UNet2DConditionModel(**kwargs)), "UNet")
    _check_consumed(unet_sd, out, "UNet")
    return out


def _convert_vae(vae_sd_prefixed):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    out = convert_ldm_vae_checkpoint(vae_sd_prefixed, SD21_VAE_CONFIG)
    _check_matches(out, _on_meta(lambda: AutoencoderKL(**SD21_VAE_CONFIG)), "VAE")
    _check_consumed(vae_sd_prefixed, out, "VAE")
    return out


def _convert_text(text_sd_prefixed):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    unknown = [k for k in text_sd_prefixed if not _OPENCLIP_TEXT_KEY.fullmatch(k[len(OPENCLIP_PREFIX):])]
    if unknown:
        raise KeyError(f"convert_mvdream_checkpoint: OpenCLIP text keys not understood: [{_few(unknown)}]")
    model = _on_meta(lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG)))
    out = convert_open_clip_checkpoint(model, text_sd_prefixed, prefix=OPENCLIP_PREFIX)
    out.pop("text_projection.weight", None)  # CLIP's projection head: CLIPTextModel has none (unused by SD)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers >= 5 dropped the "text_model." level inside CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    _check_matches(out, model, "text encoder")
    return out


def convert_mvdream_checkpoint(state_dict, unet_config="sd21-4view"):
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
        out["unet"] = _convert_unet(unet_sd, unet_config)
    if parts[LDM_VAE_PREFIX]:
        out["vae"] = _convert_vae(parts[LDM_VAE_PREFIX])
    if parts[OPENCLIP_PREFIX]:
        out["text_encoder"] = _convert_text(parts[OPENCLIP_PREFIX])
    return out


def _load_strict(model, state_dict, what):
    # assign=True: a meta-device model takes the checkpoint tensors as they are (no random init, no copy).
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"{what}: tensors left uninitialised after loading: {_few(left)}")
    return model


# ---------------------------------------------------------------------------------------------------
# Where the paper-setup weights come from (no downloads in tests; the lead's GPU box has no internet either).
ORIGINAL_REPO, ORIGINAL_FILE = "MVDream/MVDream", "sd-v2.1-base-4view.pt"
PORT_REPO = "ashawkey/mvdream-sd2.1-diffusers"
SD21_REPO = "stabilityai/stable-diffusion-2-1-base"  # source of the CLIPTokenizer that the port copied
_PORT_PATTERNS = ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
_WHAT_TO_DOWNLOAD = (
    f"Download either (a) {ORIGINAL_REPO}/{ORIGINAL_FILE} plus a CLIPTokenizer folder (tokenizer/ of {PORT_REPO} "
    f"or of {SD21_REPO}), or (b) the folder {PORT_REPO} (unet/ vae/ text_encoder/ tokenizer/ scheduler/), e.g. "
    f"`huggingface-cli download {PORT_REPO} --local-dir weights/mvdream` on a machine with internet, copy it "
    "here and pass that path (or put it in the Hugging Face cache).")


def _hub_file(repo, filename, local_files_only):
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_files_only))
    except Exception as e:  # offline, missing, gated: all mean "not here"
        raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: cannot get {repo}/{filename} ({type(e).__name__}). "
                                + _WHAT_TO_DOWNLOAD) from None


def _hub_folder(repo, local_files_only, patterns=_PORT_PATTERNS):
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_files_only))
    except Exception as e:
        raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: cannot get {repo} ({type(e).__name__}). "
                                + _WHAT_TO_DOWNLOAD) from None


def _load_clip_tokenizer(tokenizer, local_files_only):
    from transformers import CLIPTokenizer
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: tokenizer folder {tokenizer} does not exist. "
                                    + _WHAT_TO_DOWNLOAD)
        return CLIPTokenizer.from_pretrained(tokenizer)
    for repo in (PORT_REPO, SD21_REPO):
        try:
            return CLIPTokenizer.from_pretrained(_hub_folder(repo, local_files_only, ["tokenizer/*"]) / "tokenizer")
        except (FileNotFoundError, OSError):
            continue
    raise FileNotFoundError("MVDreamPolicy.from_pretrained: the original checkpoint has no tokenizer and no SD 2.1 "
                            "CLIPTokenizer was found; pass tokenizer=<folder>. " + _WHAT_TO_DOWNLOAD)


def _from_pretrained_strict(model_class, folder):
    # diffusers/transformers only warn about missing or unexpected keys; here that is an error.
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    bad = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise KeyError(f"MVDreamPolicy.from_pretrained: {folder} does not match {model_class.__name__}: {bad}")
    return model


def _read_weights(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    import zipfile
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))  # mmap: no 2nd copy
    return sd.get("state_dict", sd)


# ---------------------------------------------------------------------------------------------------
# The policy: text encoder + multi-view UNet (+ LoRA) + CFG + decoder, behind one forward (so train.py can
# wrap it in DDP). Frozen base; only LoRA parameters ever train (Carve3D Sec. 4 / spec checklist 2).
class MVDreamPolicy(nn.Module):
    num_views = 4
    LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
    LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, so load_lora_weights(dir) finds it

    def __init__(self, unet, text_encoder, tokenizer, vae=None, *, image_size, elevation, config=None):
        super().__init__()
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        self.requires_grad_(False)
        self.scheduler = make_scheduler()
        self.image_size, self.elevation, self.config = image_size, float(elevation), config
        if vae is None:  # pixel space (toy): space-to-depth by 2
            if unet.config.in_channels != 12:
                raise ValueError("MVDreamPolicy: without a VAE the UNet must take 12 = 3*2*2 pixel-unshuffled channels")
            self.latent_shape = (12, image_size // 2, image_size // 2)
        else:
            self.latent_shape = (vae.config.latent_channels, image_size // 8, image_size // 8)
        self.register_buffer("cameras", get_camera(self.num_views, elevation).to(unet.conv_in.weight.device),
                             persistent=False)
        self.register_buffer("negative_embeds", self.encode_prompts([""]), persistent=False)  # spec A.5: "" uncond
        self.lora_config = None

    @property
    def device(self):
        return self.cameras.device

    # --- text --------------------------------------------------------------------------------------
    def tokenize(self, prompts):
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string")
        if isinstance(self.tokenizer, (WordTokenizer, HashTokenizer)):
            return self.tokenizer(prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts):
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state  # after the final LayerNorm (spec A.5)

    def refresh_negative_embeds(self):
        # Call after the text encoder's weights change (loading, SFT): the cache is not a parameter.
        self.negative_embeds = self.encode_prompts([""])

    # --- the CFG noise prediction (spec A.5): [uncond; cond] in one UNet call, views contiguous ------------
    def forward(self, latents, timesteps, prompt_embeds, guidance_scale):
        B, V = latents.shape[:2]
        if V != self.num_views or tuple(latents.shape[2:]) != self.latent_shape:
            raise ValueError(f"latents must be (B, {self.num_views}, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(latents.shape)}")
        dtype = self.unet.conv_in.weight.dtype
        x = latents.reshape(B * V, *self.latent_shape).to(dtype)
        t = timesteps.to(x.device).reshape(B).repeat_interleave(V)
        context = prompt_embeds.to(dtype).repeat_interleave(V, dim=0)
        cams = self.cameras.to(dtype).repeat(B, 1)  # same cameras for every object and both CFG halves
        cfg = guidance_scale != 1.0  # s = 1 is the conditional prediction alone: skip the uncond half
        if cfg:
            uncond = self.negative_embeds.to(dtype).expand(B * V, -1, -1)
            x, t, cams = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cams, cams])
            context = torch.cat([uncond, context])
        eps = self.unet(x, t, encoder_hidden_states=context, class_labels=cams).sample
        if cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return eps.reshape(B, V, *self.latent_shape)

    # --- latents <-> images in [0, 1] --------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents, chunk=16):
        B, V = latents.shape[:2]
        z = latents.reshape(B * V, *self.latent_shape)
        if self.vae is None:
            x = F.pixel_shuffle(z.float(), 2)
        else:  # chunks bound the VAE decoder's activation memory at 256 px
            sf = self.vae.config.scaling_factor
            x = torch.cat([self.vae.decode(c.to(self.vae.dtype) / sf).sample.float() for c in z.split(chunk)])
        return (x / 2 + 0.5).clamp(0, 1).reshape(B, V, 3, self.image_size, self.image_size)

    @torch.no_grad()
    def encode(self, images, chunk=16):
        # images (B, V, 3, H, W) in [0, 1] -> latents (B, V, C, h, w); VAE: posterior mean (for SFT data)
        B, V = images.shape[:2]
        x = images.reshape(B * V, *images.shape[2:]) * 2 - 1
        if self.vae is None:
            z = F.pixel_unshuffle(x.float(), 2)
        else:
            sf = self.vae.config.scaling_factor
            z = torch.cat([self.vae.encode(c.to(self.vae.dtype)).latent_dist.mean.float() * sf for c in x.split(chunk)])
        return z.reshape(B, V, *self.latent_shape)

    # --- LoRA (peft) ---------------------------------------------------------------------------------
    # Rank-r adapters on to_q/to_k/to_v/to_out.0 of every attention (self and cross). "gaussian" init:
    # down ~ N(0, 1/r^2), up = 0, so the initial policy equals the base (DDPO/Carve3D). Adapter weights
    # are kept in fp32 whatever the base dtype.
    def add_lora(self, rank, alpha):
        from peft import LoraConfig
        if self.lora_config is not None:
            raise ValueError("add_lora: this policy already has LoRA adapters")
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=self.LORA_TARGETS)
        self.unet.add_adapter(config)
        for name, p in self.unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
        self.lora_config = config

    @contextlib.contextmanager
    def disable_adapters(self):
        # The frozen reference policy p_ref of Carve3D's KL = the same UNet with the adapters off.
        if self.lora_config is None:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def lora_state_dict(self):
        # peft keys with diffusers' "unet." prefix: the format pipeline.load_lora_weights and
        # unet.load_lora_adapter(sd, prefix="unet") read.
        from peft.utils import get_peft_model_state_dict
        if self.lora_config is None:
            raise ValueError("lora_state_dict: no LoRA adapters; call add_lora first")
        return {f"unet.{k}": v.detach() for k, v in get_peft_model_state_dict(self.unet).items()}

    def save_lora(self, directory):
        # diffusers' own writer: safetensors + the LoraConfig in the header (so alpha travels with the file).
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from peft.utils import get_peft_model_state_dict
        sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        meta = {k: v for k, v in self.lora_config.to_dict().items() if k in ("r", "lora_alpha", "target_modules")}
        StableDiffusionLoraLoaderMixin.save_lora_weights(directory, unet_lora_layers=sd, weight_name=self.LORA_FILE,
                                                         unet_lora_adapter_metadata=meta)
        return Path(directory) / self.LORA_FILE

    def load_lora(self, path_or_state_dict, alpha=None):
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        metadata = {}
        if isinstance(path_or_state_dict, dict):
            sd = dict(path_or_state_dict)
        else:
            path = Path(path_or_state_dict)
            path = path / self.LORA_FILE if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"load_lora: {path} does not exist")
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                header = (f.metadata() or {}).get("lora_adapter_metadata")
            if header:
                metadata = {k.removeprefix("unet."): v for k, v in json.loads(header).items()}
        foreign = [k for k in sd if not k.startswith("unet.")]
        if foreign:
            raise KeyError(f"load_lora: expected only 'unet.'-prefixed peft keys (lora_state_dict's format), "
                           f"got [{_few(foreign)}]")
        sd = {k.removeprefix("unet."): v for k, v in sd.items()}
        if self.lora_config is None:  # fresh policy: rebuild the adapter from the file
            ranks = {v.shape[0] for k, v in sd.items() if "lora_A" in k}
            if len(ranks) != 1:
                raise ValueError(f"load_lora: expected one LoRA rank, found {sorted(ranks)}")
            rank = ranks.pop()
            alpha = metadata.get("lora_alpha", alpha)
            if alpha is None:
                raise ValueError("load_lora: the state dict carries no lora_alpha; pass alpha= (save_lora writes it)")
            self.add_lora(rank, alpha)
        elif "lora_alpha" in metadata and metadata["lora_alpha"] != self.lora_config.lora_alpha:
            raise ValueError(f"load_lora: file has lora_alpha={metadata['lora_alpha']}, this policy "
                             f"{self.lora_config.lora_alpha}")
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(self.unet).items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if expected != got:
            bad = [k for k in set(expected) & set(got) if expected[k] != got[k]]
            raise KeyError(f"load_lora: adapter keys do not match: missing [{_few(set(expected) - set(got))}]; "
                           f"unexpected [{_few(set(got) - set(expected))}]; shape mismatches [{_few(bad)}]")
        result = set_peft_model_state_dict(self.unet, sd)  # copies into the existing (fp32) parameters
        if result.unexpected_keys:
            raise KeyError(f"load_lora: peft did not place [{_few(result.unexpected_keys)}]")

    # --- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, *, seed=0, device="cpu", dtype=torch.float32):
        # Random weights from a json-able policy config (tiny, random_init, and our own saved checkpoints).
        # Seeded in a forked RNG: construction does not disturb the caller's global RNG state.
        tok = config["tokenizer"]
        if tok["type"] == "word":
            tokenizer = WordTokenizer(tok["vocab"], tok["max_length"])
        elif tok["type"] == "hash":
            tokenizer = HashTokenizer(tok["vocab_size"], tok["max_length"])
        else:
            raise ValueError(f"from_config: tokenizer type {tok['type']!r} needs files; use from_pretrained")
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            unet = mvdream_unet(config["unet"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
            vae = AutoencoderKL(**config["vae"]) if config.get("vae") else None
        if dtype != torch.float32:  # (a no-op cast still makes diffusers warn about fp32 modules)
            unet, text_encoder, vae = (m.to(dtype) if m is not None else None for m in (unet, text_encoder, vae))
        policy = cls(unet, text_encoder, tokenizer, vae,
                     image_size=config["image_size"], elevation=config["elevation"], config=config)
        return policy.eval()

    @classmethod
    def tiny(cls, vocab, *, elevation=15.0, seed=0, max_length=16):
        # The toy world's model. elevation 15 = toy.TOY.elevation (MVDream convention, camera above).
        tokenizer = WordTokenizer(vocab, max_length)
        config = {"unet": "tiny", "text_encoder": tiny_text_config(tokenizer.vocab_size, max_length),
                  "tokenizer": {"type": "word", "vocab": tokenizer.vocab, "max_length": max_length},
                  "vae": None, "image_size": 64, "elevation": elevation}
        return cls.from_config(config, seed=seed)

    @classmethod
    def random_init(cls, config="sd21-4view", *, seed=0, device="cpu", dtype=torch.float32, elevation=0.0):
        # Full-size architecture with random weights, for benchmarks: reads no files. Prompts go through
        # HashTokenizer (there is no vocabulary to honour with random weights).
        if config != "sd21-4view":
            raise ValueError(f"random_init: config {config!r} unknown; use 'sd21-4view' (or MVDreamPolicy.tiny)")
        cfg = {"unet": "sd21-4view", "text_encoder": SD21_TEXT_CONFIG, "vae": SD21_VAE_CONFIG,
               "tokenizer": {"type": "hash", "vocab_size": SD21_TEXT_CONFIG["vocab_size"], "max_length": 77},
               "image_size": 256, "elevation": elevation}
        return cls.from_config(cfg, seed=seed, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path_or_hub_id=ORIGINAL_REPO, *, tokenizer=None, elevation=0.0, device="cpu",
                        dtype=torch.float32, local_files_only=False):
        # Accepts: our saved folder (save_pretrained), the original MVDream .pt file, the diffusers-port folder,
        # or the hub ids MVDream/MVDream and ashawkey/mvdream-sd2.1-diffusers (cache first, then the Hub).
        path = Path(path_or_hub_id)
        if not path.exists():
            if path_or_hub_id == ORIGINAL_REPO:
                path = _hub_file(ORIGINAL_REPO, ORIGINAL_FILE, local_files_only)
            elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_hub_id)):
                path = _hub_folder(str(path_or_hub_id), local_files_only)
            else:
                raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: {path_or_hub_id} is neither a local path "
                                        "nor a hub id. " + _WHAT_TO_DOWNLOAD)
        if (path / "mvdream_config.json").exists():
            return cls._from_saved(path, device, dtype)
        if path.is_dir():
            return cls._from_port_folder(path, tokenizer, elevation, device, dtype)
        return cls._from_original(path, tokenizer, elevation, device, dtype, local_files_only)

    @classmethod
    def _paper_policy(cls, unet_sd, vae, text_encoder, tokenizer, elevation, device, dtype):
        unet = _load_strict(_on_meta(lambda: mvdream_unet("sd21-4view")), unet_sd, "UNet")
        config = {"unet": "sd21-4view", "text_encoder": SD21_TEXT_CONFIG, "vae": SD21_VAE_CONFIG,
                  "tokenizer": {"type": "clip"}, "image_size": 256, "elevation": elevation}
        parts = [m.to(device=device, dtype=dtype) for m in (unet, text_encoder, vae)]
        return cls(parts[0], parts[1], tokenizer, parts[2], image_size=256, elevation=elevation, config=config).eval()

    @classmethod
    def _from_original(cls, path, tokenizer, elevation, device, dtype, local_files_only):
        parts = convert_mvdream_checkpoint(_read_weights(path))
        missing = [p for p in ("unet", "vae", "text_encoder") if p not in parts]
        if missing:
            raise KeyError(f"MVDreamPolicy.from_pretrained: {path} lacks the {missing} part(s) of MVDream")
        vae = _load_strict(_on_meta(lambda: AutoencoderKL(**SD21_VAE_CONFIG)), parts["vae"], "VAE")
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))  # not meta: position_ids is a buffer
        text_encoder.load_state_dict(parts["text_encoder"], strict=True)
        return cls._paper_policy(parts["unet"], vae, text_encoder, _load_clip_tokenizer(tokenizer, local_files_only),
                                 elevation, device, dtype)

    @classmethod
    def _from_port_folder(cls, path, tokenizer, elevation, device, dtype):
        from transformers import CLIPTokenizer
        need = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
        weights = sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")) or \
            sorted((path / "unet").glob("diffusion_pytorch_model*.bin"))
        if need or not weights:
            raise FileNotFoundError(f"MVDreamPolicy.from_pretrained: {path} is not an MVDream diffusers-port folder "
                                    f"(missing {need or 'unet/diffusion_pytorch_model.safetensors'}). "
                                    + _WHAT_TO_DOWNLOAD)
        unet_sd = convert_mvdream_checkpoint(_read_weights(weights[0]))["unet"]
        vae = _from_pretrained_strict(AutoencoderKL, path / "vae")
        text_encoder = _from_pretrained_strict(CLIPTextModel, path / "text_encoder")
        tok = CLIPTokenizer.from_pretrained(tokenizer or path / "tokenizer")
        # The port's scheduler/ holds the same DDIM config as make_scheduler() (spec A.5); we use ours.
        return cls._paper_policy(unet_sd, vae, text_encoder, tok, elevation, device, dtype)

    # --- toy checkpoints: safetensors + json (config incl. vocab), LoRA in diffusers' file next to them ---
    def save_pretrained(self, directory):
        from safetensors.torch import save_file
        if self.config is None or self.config["tokenizer"]["type"] == "clip":
            raise ValueError("save_pretrained is for toy/random policies; "
                             "ship a paper-setup run as its LoRA (save_lora)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = {k.replace(".base_layer", ""): v.detach().cpu().contiguous()
                for k, v in self.state_dict().items() if "lora_" not in k}
        save_file(base, directory / "model.safetensors")
        # the UNet config is written out in full, so a checkpoint does not depend on what "tiny" means later
        config = dict(self.config, unet=_unet_kwargs(self.config["unet"]))
        (directory / "mvdream_config.json").write_text(json.dumps(config, indent=1))
        if self.lora_config is not None:
            self.save_lora(directory)

    @classmethod
    def _from_saved(cls, path, device, dtype):
        from safetensors.torch import load_file
        config = json.loads((path / "mvdream_config.json").read_text())
        policy = cls.from_config(config, device=device, dtype=dtype)
        try:
            policy.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        except RuntimeError as e:  # torch lists the missing/unexpected keys; say which file and why
            raise KeyError(f"MVDreamPolicy.from_pretrained: {path / 'model.safetensors'} does not match its "
                           f"mvdream_config.json (a strict load found): {e}") from None
        policy.refresh_negative_embeds()
        if (path / cls.LORA_FILE).exists():
            policy.load_lora(path / cls.LORA_FILE)
        return policy


if __name__ == "__main__":
    # Demo: a random tiny policy samples 4 views of one prompt (noise in, structured-looking noise out).
    from sample import sample_trajectories
    from torchvision.utils import save_image

    policy = MVDreamPolicy.tiny(["a", "red", "blue", "cube", "ball"], seed=0)
    traj = sample_trajectories(policy, ["a red cube"], num_steps=10, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0))
    os.makedirs("outputs", exist_ok=True)
    save_image(traj["views"][0], "outputs/mvdream_demo.png", nrow=4)
    print("cameras (elevation 15):\n", get_camera(4, 15.0).view(4, 4, 4)[0])
    print(f"tiny UNet {sum(p.numel() for p in policy.unet.parameters()) / 1e6:.2f} M params; "
          f"views {tuple(traj['views'].shape)} -> outputs/mvdream_demo.png")
