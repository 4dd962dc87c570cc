# MVDream (sd-v2.1-base-4view; Shi et al. 2023, arXiv 2308.16512) as the Carve3D policy: a multi-view
# text-to-image diffusion model whose 4 views of one object attend to each other (MVDream Sec. 3.1). Carve3D
# (Sec. 4) finetunes such a model with RL; its released code (desaixie/carve3d) leaves the model to the user.
#
# Built from stock parts so that the official weights load strictly and LoRA/peft just works:
#   * the UNet is diffusers' UNet2DConditionModel with SD 2.1-base's configuration (bytedance/MVDream
#     mvdream/configs/sd-v2-base.yaml), whose camera MLP is diffusers' "projection" class embedding and whose
#     self-attentions use our multi-view processor (mvdream/ldm/modules/attention.py BasicTransformerBlock3D);
#   * text encoder = transformers' CLIPTextModel (23 layers = OpenCLIP ViT-H's "penultimate" layer);
#   * weights: support/mvdream_weights.py converts the original checkpoint and the diffusers port.
# The toy world uses the same classes at toy size, a latent model like the real one (see `tiny`).
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

from support import lora_kernel, mvdream_weights as weights
from support.mvdream_weights import SD21_TEXT_CONFIG, SD21_VAE_CONFIG, HashTokenizer, WordTokenizer

# ---------------------------------------------------------------------------------------------------
# UNet configurations
#
# "sd21-4view": SD 2.1-base UNet + camera MLP (MVDream's sd-v2-base.yaml: 867,572,164 params, 690 tensors).
# SD2 naming quirk: `attention_head_dim` is really the number of heads (64-dim heads everywhere).
#
# "tiny": the toy world's model, a latent diffusion model like the real one: it denoises the 4x16x16 latents
# of the toy VAE (TINY_VAE_CONFIG) at 16, 8 and 4 px, with multi-view + text attention at 8x8 and 4x4 (4 views
# x 64 tokens at 8x8 are cheap), head dim 16; 2.7 M parameters. Sized for a hard CPU budget: one CFG forward
# for 8 prompts x 4 views (batch 64) is 14 GFLOP. bench/sample.py times the policy. Latent, as MVDream is: a
# pixel-space toy model left coloured noise in its samples' backgrounds.
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
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4, 6), use_linear_projection=True,
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=8, norm_eps=1e-5, act_fn="silu",
        class_embed_type="projection", projection_class_embeddings_input_dim=16,
    ),
}


# The toy world's VAE: diffusers' AutoencoderKL (the class of SD's VAE) at toy size, trained by `python -m toy.sft vae` on
# toy renders: 64x64x3 images <-> 4x16x16 latents (factor 4). scaling_factor is set from the trained latents'
# spread, as SD's 0.18215 was (LDM Sec. 3, Rombach et al. 2022); latents_mean as _latent_normalization says.
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
    block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, act_fn="silu", norm_num_groups=16, scaling_factor=1.0,
    latents_mean=None,
)


def tiny_text_config(vocab_size, max_length):
    # 2 layers, width 64 = the tiny UNet's cross_attention_dim.
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_length, hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---------------------------------------------------------------------------------------------------
# Multi-view ("3D") self-attention (MVDream Sec. 3.1; mvdream/ldm/modules/attention.py)
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
        q, k, v = self.project(attn, x, context)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        return out.reshape(BF, L, -1)

    def project(self, attn, x, context):
        return attn.to_q(x), attn.to_k(context), attn.to_v(context)


class FusedQKVAttnProcessor(MultiViewAttnProcessor):
    # Beyond the paper (config fused_lora): a self-attention's q, k and v share their input, so with fused LoRA
    # layers they are one GEMM (support/lora_kernel.shared_input); the same function as the processor above.
    def project(self, attn, x, context):
        qkv = lora_kernel.shared_input((attn.to_q, attn.to_k, attn.to_v), x) if context is x else None
        return qkv or super().project(attn, x, context)


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
                         "projection_class_embeddings_input_dim=16 (the camera MLP)")
    unet = UNet2DConditionModel(**kwargs)
    # attn1 = self-attention of every transformer block (16 in the full model, incl. the mid block).
    unet.set_attn_processor({name: MultiViewAttnProcessor(num_frames) if name.endswith("attn1.processor")
                             else AttnProcessor2_0() for name in unet.attn_processors})
    return unet


# ---------------------------------------------------------------------------------------------------
# Cameras (mvdream/camera_utils.py get_camera)
#
# One 16-vector per view: MVDream's camera-to-world matrix (radius 1, looking at the origin) with the world
# changed from OpenGL (y up) to "blender" (z up), flattened row-major. Elevation is in MVDream's convention
# (positive = camera ABOVE the object). The paper setup uses elevation 0: that is what LGM's text-to-3D app
# feeds MVDream (3DTopia/LGM app.py); MVDream's own scripts default to 15 (the toy world uses 15).
# View order vs LGM: LGM input view k <- MVDream view reconstruct.MVDREAM_TO_LGM[k] = (1, 2, 3, 0)[k]
# (LGM app.py); that mapping lives in reconstruct.py, not here.
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
# Noise schedule: MVDream was trained with SD's schedule (1000 steps, scaled_linear 0.00085 -> 0.012,
# epsilon prediction; mvdream/configs/sd-v2-base.yaml). This DDIMScheduler config is exactly what the
# diffusers port writes; the step spacing caveat (S = 30) is documented in sample.py where S is chosen.
def make_scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
                         timestep_spacing="leading")


def convert_mvdream_checkpoint(state_dict, unet_config="sd21-4view"):
    """MVDream's LDM checkpoint (original .pt or the port's unet weights) -> diffusers state dicts by part."""
    return weights.convert_mvdream_checkpoint(state_dict, _unet_kwargs(unet_config))



# ---------------------------------------------------------------------------------------------------
# The policy: text encoder + multi-view UNet (+ LoRA) + CFG + decoder, behind one forward (so train.py can
# wrap it in DDP). Frozen base; only LoRA parameters ever train (Carve3D Sec. 4, as DDPO's LoRA setup).
class MVDreamPolicy(nn.Module):
    num_views = 4
    LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
    LORA_FILE = weights.LORA_FILE  # diffusers' name, so load_lora_weights(dir) finds it

    def __init__(self, unet, text_encoder, tokenizer, vae, *, image_size, elevation, config=None):
        super().__init__()
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        self.requires_grad_(False)
        self.scheduler = make_scheduler()
        self.image_size, self.elevation, self.config = image_size, float(elevation), config
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD's VAE, 4 for the toy's
        self.latent_shape = (vae.config.latent_channels, image_size // factor, image_size // factor)
        self.register_buffer("cameras", get_camera(self.num_views, elevation).to(unet.conv_in.weight.device),
                             persistent=False)
        self.register_buffer("negative_embeds", self.encode_prompts([""]), persistent=False)  # "" uncond (MVDream scripts/t2i.py)
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
        return self.text_encoder(ids).last_hidden_state  # after the final LayerNorm (diffusers' SD 2.1 convention)

    def refresh_negative_embeds(self):
        # Call after the text encoder's weights change (loading, SFT): the cache is not a parameter.
        self.negative_embeds = self.encode_prompts([""])

    # --- the CFG noise prediction: [uncond; cond] in one UNet call, views contiguous -------------------------
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
        mean, sf = self._latent_normalization(z)  # chunks bound the VAE decoder's activation memory at 256 px
        x = torch.cat([self.vae.decode((c / sf + mean).to(self.vae.dtype)).sample.float() for c in z.split(chunk)])
        return (x / 2 + 0.5).clamp(0, 1).reshape(B, V, 3, self.image_size, self.image_size)

    @torch.no_grad()
    def encode(self, images, chunk=16):
        # images (B, V, 3, H, W) in [0, 1] -> latents (B, V, C, h, w); VAE: posterior mean (for SFT data)
        B, V = images.shape[:2]
        x = images.reshape(B * V, *images.shape[2:]) * 2 - 1
        mean, sf = self._latent_normalization(x)
        z = torch.cat([(self.vae.encode(c.to(self.vae.dtype)).latent_dist.mean.float() - mean) * sf
                       for c in x.split(chunk)])
        return z.reshape(B, V, *self.latent_shape)

    def _latent_normalization(self, like):
        # SD's VAE scales its latents by scaling_factor alone. The toy's VAE also sets diffusers' per-channel
        # latents_mean: its white background's latent, so that the background is 0 in the diffusion model's
        # space. Why: SD's schedule keeps signal at its first step (Lin et al. 2024), so a model trained on
        # latents whose background is far from 0 reads sampling's pure noise as missing background and
        # draws objects too large (toy/sft.py).
        c = self.vae.config
        if getattr(c, "latents_std", None) is not None:
            raise ValueError("the VAE's config sets latents_std, which MVDreamPolicy does not apply: set it to null "
                             "(scaling_factor scales the latents)")
        mean = getattr(c, "latents_mean", None)
        mean = 0.0 if mean is None else torch.tensor(mean, dtype=torch.float32, device=like.device).view(-1, 1, 1)
        return mean, c.scaling_factor

    # --- LoRA (peft) ---------------------------------------------------------------------------------
    # Rank-r adapters on to_q/to_k/to_v/to_out.0 of every attention (self and cross). "gaussian" init:
    # down ~ N(0, 1/r^2), up = 0, so the initial policy equals the base (DDPO/Carve3D). Adapter weights
    # are kept in fp32 whatever the base dtype.
    def add_lora(self, rank, alpha, fused=False):
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
        self.fuse_lora(fused)

    def fuse_lora(self, enabled=True):
        # LoRA layers as one GEMM each (support/lora_kernel.py): the same function with fewer passes over the
        # activations (paper setup: epoch 5% faster); the adapters stay peft's, so saving and loading are unchanged
        from peft.tuners.lora.layer import Linear as LoraLinear
        for m in self.unet.modules():
            if isinstance(m, LoraLinear):
                (lora_kernel.fuse if enabled else lora_kernel.unfuse)(m)
        processor = FusedQKVAttnProcessor if enabled else MultiViewAttnProcessor
        self.unet.set_attn_processor({name: processor(p.num_frames) if isinstance(p, MultiViewAttnProcessor) else p
                                      for name, p in self.unet.attn_processors.items()})

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
        if self.lora_config is None:
            raise ValueError("lora_state_dict: no LoRA adapters; call add_lora first")
        return {f"unet.{k}": v.detach() for k, v in get_peft_model_state_dict(self.unet).items()}

    def save_lora(self, directory):
        return weights.write_lora(directory, get_peft_model_state_dict(self.unet), self.lora_config)

    def load_lora(self, path_or_state_dict, alpha=None):
        sd, metadata = weights.read_lora(path_or_state_dict)
        if self.lora_config is None:  # fresh policy: rebuild the adapter from the file
            ranks = {v.shape[0] for k, v in sd.items() if "lora_A" in k}
            if len(ranks) != 1:
                raise ValueError(f"load_lora: expected one LoRA rank, found {sorted(ranks)}")
            alpha = metadata.get("lora_alpha", alpha)
            if alpha is None:
                raise ValueError("load_lora: the state dict carries no lora_alpha; pass alpha= (save_lora writes it)")
            self.add_lora(ranks.pop(), alpha)
        elif "lora_alpha" in metadata and metadata["lora_alpha"] != self.lora_config.lora_alpha:
            raise ValueError(f"load_lora: file has lora_alpha={metadata['lora_alpha']}, this policy "
                             f"{self.lora_config.lora_alpha}")
        weights.check_lora_keys(get_peft_model_state_dict(self.unet), sd)
        result = set_peft_model_state_dict(self.unet, sd)  # copies into the existing (fp32) parameters
        if result.unexpected_keys:
            raise KeyError(f"load_lora: peft did not place [{weights._few(result.unexpected_keys)}]")

    # --- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, *, seed=0, device="cpu", dtype=torch.float32):
        # Random weights from a json-able policy config (tiny, random_init, and our own saved checkpoints).
        # Seeded in a forked RNG: construction does not disturb the caller's global RNG state.
        if not config.get("vae"):
            raise ValueError("from_config: the policy config has no 'vae' entry (a pixel-space toy checkpoint of an "
                             "earlier version?); retrain it with `python -m toy.sft vae` then `python -m toy.sft mvdream`")
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
            vae = AutoencoderKL(**config["vae"])
        if dtype != torch.float32:  # (a no-op cast still makes diffusers warn about fp32 modules)
            unet, text_encoder, vae = (m.to(dtype) for m in (unet, text_encoder, vae))
        policy = cls(unet, text_encoder, tokenizer, vae,
                     image_size=config["image_size"], elevation=config["elevation"], config=config)
        return policy.eval()

    @classmethod
    def tiny(cls, vocab, *, elevation=15.0, seed=0, max_length=16, vae=None):
        # The toy world's model. elevation 15 = world.TOY.elevation (MVDream convention, camera above).
        # vae: a trained toy AutoencoderKL (toy/sft.py vae) to build on; random weights otherwise.
        tokenizer = WordTokenizer(vocab, max_length)
        vae_config = dict(TINY_VAE_CONFIG) if vae is None else {k: vae.config[k] for k in TINY_VAE_CONFIG}
        config = {"unet": "tiny", "text_encoder": tiny_text_config(tokenizer.vocab_size, max_length),
                  "tokenizer": {"type": "word", "vocab": tokenizer.vocab, "max_length": max_length},
                  "vae": vae_config, "image_size": 64, "elevation": elevation}
        policy = cls.from_config(config, seed=seed)
        if vae is not None:
            policy.vae.load_state_dict(vae.state_dict())
        return policy

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
    def from_pretrained(cls, path_or_hub_id=weights.ORIGINAL_REPO, *, tokenizer=None, elevation=0.0, device="cpu",
                        dtype=torch.float32, local_files_only=False):
        # Accepts: our saved folder (save_pretrained), the original MVDream .pt file, the diffusers-port folder,
        # or the hub ids MVDream/MVDream and ashawkey/mvdream-sd2.1-diffusers (cache first, then the Hub).
        path, parts = weights.load_paper_parts(path_or_hub_id, tokenizer, local_files_only,
                                               _unet_kwargs("sd21-4view"))
        if parts is None:
            return cls._from_saved(path, device, dtype)
        unet = weights.load_strict(weights.on_meta(lambda: mvdream_unet("sd21-4view")), parts["unet"], "UNet")
        config = {"unet": "sd21-4view", "text_encoder": SD21_TEXT_CONFIG, "vae": SD21_VAE_CONFIG,
                  "tokenizer": {"type": "clip"}, "image_size": 256, "elevation": elevation}
        unet, text_encoder, vae = (m.to(device=device, dtype=dtype) for m in (unet, parts["text_encoder"], parts["vae"]))
        return cls(unet, text_encoder, parts["tokenizer"], vae, image_size=256, elevation=elevation,
                   config=config).eval()

    # --- toy checkpoints: safetensors + json (config incl. vocab), LoRA in diffusers' file next to them ---
    def save_pretrained(self, directory, dtype=None):
        # dtype: store the weights in e.g. float16 (the shipped toy checkpoints); loading casts them back.
        if self.config is None or self.config["tokenizer"]["type"] == "clip":
            raise ValueError("save_pretrained is for toy/random policies; "
                             "ship a paper-setup run as its LoRA (save_lora)")
        base = {k.replace(".base_layer", ""): v.to(dtype) if dtype is not None and v.is_floating_point() else v
                for k, v in self.state_dict().items() if "lora_" not in k}
        # the UNet config is written out in full, so a checkpoint does not depend on what "tiny" means later
        weights.write_saved_policy(directory, base, dict(self.config, unet=_unet_kwargs(self.config["unet"])))
        if self.lora_config is not None:
            self.save_lora(directory)

    @classmethod
    def _from_saved(cls, path, device, dtype):
        policy = cls.from_config(weights.read_saved_config(path), device=device, dtype=dtype)
        weights.load_saved_weights(policy, path)
        policy.refresh_negative_embeds()
        if (path / cls.LORA_FILE).exists():
            policy.load_lora(path / cls.LORA_FILE)
        return policy


if __name__ == "__main__":
    # Demo: a random tiny policy predicts the noise of 4 views of one prompt with CFG; the cameras it is told.
    torch.manual_seed(0)
    policy = MVDreamPolicy.tiny(["a", "red", "blue", "cube", "ball"], seed=0)
    policy.add_lora(4, 4)
    x = torch.randn(1, policy.num_views, *policy.latent_shape)
    emb = policy.encode_prompts(["a red cube"])
    eps = policy(x, torch.tensor([500]), emb, guidance_scale=5.0)
    with policy.disable_adapters():
        eps_ref = policy(x, torch.tensor([500]), emb, guidance_scale=5.0)
    print("cameras (elevation 15), view 0:\n", get_camera(4, 15.0).view(4, 4, 4)[0])
    print(f"tiny UNet {sum(p.numel() for p in policy.unet.parameters()) / 1e6:.2f} M params; latents "
          f"{tuple(x.shape)} -> eps {tuple(eps.shape)}; with LoRA up = 0 the reference agrees: "
          f"max |eps - eps_ref| = {(eps - eps_ref).abs().max().item():.1e}")
    os.makedirs("outputs", exist_ok=True)
    print("decoded views:", tuple(policy.decode(x).shape))
