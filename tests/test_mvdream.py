import math
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel

import mvdream
from support import mvdream_weights
from mvdream import FusedQKVAttnProcessor, MVDreamPolicy, MultiViewAttnProcessor, convert_mvdream_checkpoint, get_camera, mvdream_unet

# The 690 UNet keys and shapes of the original checkpoint (bytedance/MVDream's
# sd-v2.1-base-4view.pt, model.diffusion_model.*): sha256 of the sorted "key:d0,d1,..." lines, so the test needs no file outside the repo.
REFERENCE_UNET_KEYS_SHA256 = "f74abac0365360b66df6dd85c00fb8b646ec9c6b35e4f16638e08c6ea719e338"
VOCAB = ["a", "red", "blue", "green", "cube", "ball", "with", "on", "its", "top"]


def _meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(scope="module")
def policy():
    return MVDreamPolicy.tiny(VOCAB, seed=0)


def _inputs(policy, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, 4) + policy.latent_shape, generator=g)
    t = torch.tensor([900, 37][:B])
    emb = policy.encode_prompts(["a red cube", "a blue ball with a green cube on its top"][:B])
    return x, t, emb


def _randomize_zero_tensors(module, seed=0):
    # zero-initialised tensors would hide whole paths from a comparison
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------------
# Cameras: values of mvdream/camera_utils.py get_camera

def test_get_camera_elevation_0_vectors():
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, -1, -1, 0, 1, 0, 0, 0, 0, 0, 1],
        [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        [-1, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        [0, 0, -1, -1, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.float32)
    cams = get_camera(4, elevation=0.0)
    assert cams.shape == (4, 16) and cams.dtype == torch.float32
    torch.testing.assert_close(cams, expected, atol=1e-6, rtol=0)


def test_get_camera_elevation_15_view0():
    s, c = math.sin(math.radians(15)), math.cos(math.radians(15))
    expected = torch.tensor([[1, 0, 0, 0], [0, s, -c, -c], [0, c, s, s], [0, 0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(get_camera(4, elevation=15.0)[0].view(4, 4), expected, atol=1e-6, rtol=0)
    assert abs(0.2588 - s) < 1e-4 and abs(0.9659 - c) < 1e-4  # cos/sin of 15 degrees


def test_get_camera_azimuths_and_no_blender():
    gl = get_camera(4, elevation=0.0, blender_coord=False).view(4, 4, 4)
    # OpenGL world: camera k sits at (sin a, 0, cos a), a = 0, 90, 180, 270
    pos = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, -1], [-1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(gl[:, :3, 3], pos, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# A.3 multi-view attention

def test_processor_matches_bruteforce_joint_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    x = torch.randn(2 * 4, 5, 32)  # 2 objects x 4 views, 5 tokens per view
    out = MultiViewAttnProcessor(4)(attn, x)
    for obj in range(2):
        tokens = x[obj * 4:(obj + 1) * 4].reshape(20, 32)  # view-major concatenation
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        heads = []
        for h in range(2):
            sl = slice(16 * h, 16 * (h + 1))
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(16), dim=-1)
            heads.append(w @ v[:, sl])
        ref = attn.to_out[0](torch.cat(heads, dim=-1)).reshape(4, 5, 32)
        torch.testing.assert_close(out[obj * 4:(obj + 1) * 4], ref, atol=1e-5, rtol=1e-5)


def test_unet_with_one_view_equals_stock_processor():
    torch.manual_seed(0)
    mv = mvdream_unet("tiny", num_frames=1).eval()
    _randomize_zero_tensors(mv)
    stock = UNet2DConditionModel(**mvdream.UNET_CONFIGS["tiny"]).eval()
    stock.load_state_dict(mv.state_dict())
    stock.set_attn_processor(AttnProcessor2_0())
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 999])
    ctx, cam = torch.randn(3, 7, 64), get_camera(3)
    with torch.no_grad():
        torch.testing.assert_close(mv(x, t, ctx, class_labels=cam).sample, stock(x, t, ctx, class_labels=cam).sample,
                                   atol=1e-5, rtol=1e-5)


def test_unet_views_mix_within_object_only_and_objects_permute():
    torch.manual_seed(0)
    unet = mvdream_unet("tiny").eval()
    n_mv = sum(isinstance(p, MultiViewAttnProcessor) for p in unet.attn_processors.values())
    n_attn1 = sum(name.endswith("attn1.processor") for name in unet.attn_processors)
    assert n_mv == n_attn1 > 0
    _randomize_zero_tensors(unet)
    x, t = torch.randn(8, 4, 16, 16), torch.tensor([700] * 4 + [300] * 4)
    ctx, cam = torch.randn(8, 7, 64), get_camera(4).repeat(2, 1)
    with torch.no_grad():
        base = unet(x, t, ctx, class_labels=cam).sample
        x2 = x.clone()
        x2[2] += 1.0  # object 0, view 2
        changed = unet(x2, t, ctx, class_labels=cam).sample
        assert (changed[0] - base[0]).abs().max() > 1e-3  # view 0 of the same object sees view 2
        assert torch.equal(changed[4:], base[4:])  # the other object never does
        perm = torch.cat([torch.arange(4, 8), torch.arange(0, 4)])
        swapped = unet(x[perm], t[perm], ctx[perm], class_labels=cam[perm]).sample
        torch.testing.assert_close(swapped, base[perm], atol=1e-5, rtol=1e-5)


def test_processor_rejects_partial_objects():
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    with pytest.raises(ValueError, match="num_frames"):
        MultiViewAttnProcessor(4)(attn, torch.randn(6, 5, 32))


def test_full_size_policy_on_meta():
    # random_init builds every module and buffer on the requested device (here meta: no memory, no compute)
    from torch.utils.flop_counter import FlopCounterMode
    policy = MVDreamPolicy.random_init("sd21-4view", device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta for t in list(policy.parameters()) + list(policy.buffers()))
    assert policy.latent_shape == (4, 32, 32) and policy.negative_embeds.shape == (1, 77, 1024)
    x = torch.empty(1, 4, 4, 32, 32, device="meta")
    emb = policy.encode_prompts(["a red cube"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eps = policy(x, torch.full((1,), 500, device="meta"), emb, 1.0)
    assert eps.shape == x.shape
    assert abs(counter.get_total_flops() / 1e9 - 816.2) < 0.5  # 4 views, joint attention (counted once by hand)
    assert policy.decode(x).shape == (1, 4, 3, 256, 256)


def test_full_size_unet_config_on_meta():
    unet = _meta(lambda: mvdream_unet("sd21-4view"))
    assert sum(p.numel() for p in unet.parameters()) == 867_572_164  # MVDream sd-v2-base.yaml
    assert len(unet.state_dict()) == 690
    assert sum(isinstance(p, MultiViewAttnProcessor) for p in unet.attn_processors.values()) == 16  # MVDream sd-v2-base.yaml


# ---------------------------------------------------------------------------------------------------
# Checkpoint conversion. Inverse maps written from the LDM naming, independently of diffusers.

_RES_INV = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm_unet_key(key, config):
    L = config["layers_per_block"]
    attn_levels = ["CrossAttn" in b for b in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding.linear_1": "camera_embed.0", "class_embedding.linear_2": "camera_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"

    def res(rest):
        first, _, tail = rest.partition(".")
        return f"{_RES_INV[first]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{res(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{res(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * (L + 1) + L}.{2 if attn_levels[b] else 1}.conv.{m[2]}"
    raise AssertionError(f"no LDM name for {key}")


def _reference_keys():
    # Original-layout UNet keys and shapes, generated by the inverse map (validated by the test below).
    unet = _meta(lambda: mvdream_unet("sd21-4view"))
    return {diffusers_to_ldm_unet_key(k, mvdream.UNET_CONFIGS["sd21-4view"]): tuple(v.shape)
            for k, v in unet.state_dict().items()}


def test_inverse_map_reproduces_the_reference_key_list():
    import hashlib
    ref = _reference_keys()
    assert len(ref) == 690
    canon = "\n".join(f"{k}:{','.join(map(str, ref[k]))}" for k in sorted(ref))
    assert hashlib.sha256(canon.encode()).hexdigest() == REFERENCE_UNET_KEYS_SHA256
    # a few entries of the LDM -> diffusers naming
    assert ref["camera_embed.0.weight"] == (1280, 16) and ref["camera_embed.2.weight"] == (1280, 1280)
    assert ref["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert ref["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert ref["input_blocks.1.1.proj_in.weight"] == (320, 320)


def _vae_ldm_keys():
    vae = _meta(lambda: AutoencoderKL(**mvdream_weights.SD21_VAE_CONFIG))
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in vae.state_dict().items():
        shape = tuple(v.shape)
        n = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            n = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                shape = shape + (1, 1)  # LDM uses 1x1 convs
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", n):
            n = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)\.(.+)", n):
            n = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.(.+)", n):
            n = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.+)", n):
            n = f"decoder.up.{3 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.+)", n):
            n = f"decoder.up.{3 - int(m[1])}.upsample.{m[2]}"
        out[n] = shape
    assert len(out) == 248  # the SD 2.1 VAE's tensors
    return out


def _openclip_text_keys(layers=24, width=1024):
    keys = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
            "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width),
            "logit_scale": ()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        keys.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                     p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                     p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                     p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (4 * width, width),
                     p + "mlp.c_fc.bias": (4 * width,), p + "mlp.c_proj.weight": (width, 4 * width),
                     p + "mlp.c_proj.bias": (width,)})
    return keys


def _meta_sd(shapes, prefix=""):
    return {prefix + k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _original_checkpoint():
    sd = _meta_sd(_reference_keys(), "model.diffusion_model.")
    sd.update(_meta_sd(_vae_ldm_keys(), "first_stage_model."))
    sd.update(_meta_sd(_openclip_text_keys(), "cond_stage_model.model."))
    sd.update({k: torch.empty(1000, device="meta") for k in mvdream_weights.LDM_SCHEDULE_BUFFERS})
    return sd


def test_convert_original_layout_loads_strictly():
    parts = convert_mvdream_checkpoint(_original_checkpoint())
    assert set(parts) == {"unet", "vae", "text_encoder"}
    assert len(parts["unet"]) == 690 and len(parts["vae"]) == 248
    unet = _meta(lambda: mvdream_unet("sd21-4view"))
    unet.load_state_dict(parts["unet"], strict=True, assign=True)
    vae = _meta(lambda: AutoencoderKL(**mvdream_weights.SD21_VAE_CONFIG))
    vae.load_state_dict(parts["vae"], strict=True, assign=True)
    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(**mvdream_weights.SD21_TEXT_CONFIG)))
    text.load_state_dict(parts["text_encoder"], strict=True, assign=True)
    assert tuple(unet.class_embedding.linear_1.weight.shape) == (1280, 16)


def test_convert_port_layout_loads_strictly():
    parts = convert_mvdream_checkpoint(_meta_sd(_reference_keys()))
    assert set(parts) == {"unet"}
    _meta(lambda: mvdream_unet("sd21-4view")).load_state_dict(parts["unet"], strict=True, assign=True)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("output_blocks.5.2.conv.weight"), "missing"),
    (lambda sd: sd.pop("camera_embed.2.bias"), "camera_embed.2.bias"),
    (lambda sd: sd.__setitem__("time_embed.4.weight", torch.empty(3, device="meta")), "time_embed.4.weight"),
    (lambda sd: sd.__setitem__("input_blocks.1.1.extra.weight", torch.empty(3, device="meta")), "unexpected"),
    (lambda sd: sd.__setitem__("input_blocks.1.1.proj_in.weight", torch.empty(3, 3, device="meta")), "shape"),
    (lambda sd: sd.__setitem__("lora.weight", torch.empty(3, device="meta")), "unrecognised layout"),
])
def test_convert_rejects_bad_unet_keys(edit, match):
    sd = _meta_sd(_reference_keys())
    edit(sd)
    with pytest.raises(KeyError, match=match):
        convert_mvdream_checkpoint(sd)


def test_convert_rejects_unknown_original_keys():
    sd = _original_checkpoint()
    sd["model_ema.decay"] = torch.empty((), device="meta")
    with pytest.raises(KeyError, match="model_ema.decay"):
        convert_mvdream_checkpoint(sd)
    sd = _original_checkpoint()
    sd["cond_stage_model.model.visual.proj"] = torch.empty(3, device="meta")
    with pytest.raises(KeyError, match="visual.proj"):
        convert_mvdream_checkpoint(sd)


def test_tiny_ldm_round_trip_numerics():
    torch.manual_seed(0)
    src = mvdream_unet("tiny").eval()
    _randomize_zero_tensors(src)
    ldm = {"model.diffusion_model." + diffusers_to_ldm_unet_key(k, mvdream.UNET_CONFIGS["tiny"]): v
           for k, v in src.state_dict().items()}
    parts = convert_mvdream_checkpoint(ldm, unet_config="tiny")
    dst = mvdream_unet("tiny").eval()
    dst.load_state_dict(parts["unet"], strict=True)
    x, t = torch.randn(4, 4, 16, 16), torch.tensor([999, 500, 20, 1])
    ctx, cam = torch.randn(4, 7, 64), get_camera(4)
    with torch.no_grad():
        assert torch.equal(src(x, t, ctx, class_labels=cam).sample, dst(x, t, ctx, class_labels=cam).sample)


# ---------------------------------------------------------------------------------------------------
# Tokenizer, text, CFG, decode

def test_word_tokenizer():
    tok = mvdream_weights.WordTokenizer(["a", "red", "cube"], max_length=6)
    ids = tok(["A red, cube!", ""])
    assert ids.tolist() == [[1, 3, 4, 5, 2, 0], [1, 2, 0, 0, 0, 0]]
    with pytest.raises(KeyError, match="'sphere'"):
        tok(["a red sphere"])
    with pytest.raises(ValueError, match="max_length"):
        tok(["a red cube a red"])


def test_negative_embeds_are_the_empty_prompt(policy):
    assert policy.negative_embeds.shape == (1, 16, 64)
    assert torch.equal(policy.negative_embeds, policy.encode_prompts([""]))


def test_forward_is_cfg_over_two_plain_unet_calls(policy):
    x, t, emb = _inputs(policy)
    with torch.no_grad():
        eps = policy(x, t, emb, 7.5)
        cond_only = policy(x, t, emb, 1.0)
        cams = get_camera(4, 15.0).repeat(2, 1)  # toy elevation, same cameras for each object
        flat = x.reshape(8, 4, 16, 16)
        tt = t.repeat_interleave(4)
        c = policy.unet(flat, tt, emb.repeat_interleave(4, 0), class_labels=cams).sample
        u = policy.unet(flat, tt, policy.negative_embeds.expand(8, -1, -1), class_labels=cams).sample
    torch.testing.assert_close(cond_only, c.view_as(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, (u + 7.5 * (c - u)).view_as(x), atol=1e-4, rtol=1e-4)
    assert eps.shape == x.shape


def test_decode_encode_through_the_vae_as_ldm_does(policy):
    # latents = VAE posterior mean x scaling_factor; images = VAE decode of latents / scaling_factor, [-1,1] -> [0,1]
    vae, sf = policy.vae, 0.7
    vae.register_to_config(scaling_factor=sf)
    images = torch.rand(1, 4, 3, 64, 64)
    z = policy.encode(images)
    assert z.shape == (1, 4, 4, 16, 16) and policy.latent_shape == (4, 16, 16)
    with torch.no_grad():
        ref = vae.encode(images[0] * 2 - 1).latent_dist.mean * sf
        torch.testing.assert_close(z[0], ref)
        torch.testing.assert_close(policy.decode(z)[0], (vae.decode(ref / sf).sample / 2 + 0.5).clamp(0, 1))
    vae.register_to_config(scaling_factor=1.0)


def test_latents_mean_shifts_each_channel_before_scaling(policy):
    # the toy VAE's diffusers field latents_mean: latents = (posterior mean - latents_mean[c]) x scaling_factor
    vae, sf, mean = policy.vae, 0.7, [0.5, -1.0, 2.0, 0.25]
    vae.register_to_config(scaling_factor=sf, latents_mean=mean)
    try:
        images = torch.rand(1, 4, 3, 64, 64)
        z = policy.encode(images)
        with torch.no_grad():
            raw = vae.encode(images[0] * 2 - 1).latent_dist.mean
            for c in range(4):
                torch.testing.assert_close(z[0, :, c], (raw[:, c] - mean[c]) * sf)
            torch.testing.assert_close(policy.decode(z)[0], (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1),
                                       atol=1e-5, rtol=1e-5)
        vae.register_to_config(latents_std=[1.0] * 4)
        with pytest.raises(ValueError, match="latents_std"):
            policy.encode(images)
    finally:
        vae.register_to_config(scaling_factor=1.0, latents_mean=None, latents_std=None)


def test_frozen_base(policy):
    assert not any(p.requires_grad for p in policy.parameters())


# ---------------------------------------------------------------------------------------------------
# LoRA

def test_lora_init_disable_and_train_step():
    policy = MVDreamPolicy.tiny(VOCAB, seed=1)
    x, t, emb = _inputs(policy)
    with torch.no_grad():
        base = policy(x, t, emb, 3.0)
    policy.add_lora(4, 8)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(policy(x, t, emb, 3.0), base)  # up-projection = 0
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-1)
    policy(x, t, emb, 3.0).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert (policy(x, t, emb, 3.0) - base).abs().max() > 1e-6
        with policy.disable_adapters():
            assert torch.equal(policy(x, t, emb, 3.0), base)
        assert (policy(x, t, emb, 3.0) - base).abs().max() > 1e-6  # re-enabled on exit
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_fused_lora_computes_peft_lora(trained_lora_policy):
    # support/lora_kernel.py: [x | x A^T] @ [W | s B]^T with a hand-written backward = peft's base(x) + s B(A(x)):
    # outputs and LoRA gradients agree in fp32 (to rounding), adapters off is the base exactly, unfuse restores peft
    policy = trained_lora_policy()
    x, t, emb = _inputs(policy)
    params = [p for p in policy.parameters() if p.requires_grad]

    def run():
        eps = policy(x, t, emb, 3.0)
        grads = torch.autograd.grad(eps.square().mean(), params)
        with torch.no_grad(), policy.disable_adapters():
            return eps.detach(), grads, policy(x, t, emb, 3.0)

    eps0, g0, base0 = run()
    policy.fuse_lora()
    self_attn = [p for n, p in policy.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert self_attn and all(type(p) is FusedQKVAttnProcessor for p in self_attn)  # q, k, v as one GEMM
    eps1, g1, base1 = run()
    assert torch.equal(base1, base0)
    assert (eps1 - eps0).abs().max() < 1e-4 * eps0.abs().max() and (eps0 - base0).abs().max() > 1e-3
    for a, b in zip(g1, g0):
        assert (a - b).norm() <= 1e-4 * b.norm() and b.norm() > 0
    policy.fuse_lora(False)
    assert all(type(p) is MultiViewAttnProcessor for n, p in policy.unet.attn_processors.items()
               if n.endswith("attn1.processor"))
    assert torch.equal(run()[0], eps0)


@pytest.fixture
def trained_lora_policy(fill_lora_up):
    def make(seed=2):
        policy = MVDreamPolicy.tiny(VOCAB, seed=seed)
        policy.add_lora(4, 8)
        return fill_lora_up(policy, 0.05, 5)
    return make


def test_lora_save_load_round_trip(tmp_path, trained_lora_policy):
    policy = trained_lora_policy()
    x, t, emb = _inputs(policy)
    with torch.no_grad():
        want = policy(x, t, emb, 3.0)
    path = policy.save_lora(tmp_path)
    fresh = MVDreamPolicy.tiny(VOCAB, seed=2)
    fresh.load_lora(path)
    assert fresh.lora_config.r == 4 and fresh.lora_config.lora_alpha == 8
    with torch.no_grad():
        assert torch.equal(fresh(x, t, emb, 3.0), want)
    # the in-memory state dict too (alpha must then be given or already set)
    again = MVDreamPolicy.tiny(VOCAB, seed=2)
    with pytest.raises(ValueError, match="alpha"):
        again.load_lora(policy.lora_state_dict())
    again.load_lora(policy.lora_state_dict(), alpha=8)
    with torch.no_grad():
        assert torch.equal(again(x, t, emb, 3.0), want)


def test_lora_file_is_readable_by_diffusers(tmp_path, trained_lora_policy):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    policy = trained_lora_policy()
    x, t, emb = _inputs(policy)
    with torch.no_grad():
        want = policy(x, t, emb, 3.0)
    policy.save_lora(tmp_path)
    fresh = MVDreamPolicy.tiny(VOCAB, seed=2)
    sd, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    # in a fixed order, so that one run's LoRA file is byte for byte the same in every process (peft keeps a set)
    assert meta["unet.target_modules"] == sorted(policy.lora_config.target_modules), meta
    fresh.unet.load_lora_adapter(sd, prefix="unet", metadata=meta)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, emb, 3.0), want, atol=1e-6, rtol=1e-6)


def test_lora_load_is_strict(trained_lora_policy):
    policy = trained_lora_policy()
    sd = policy.lora_state_dict()
    sd.pop(next(iter(sd)))
    fresh = trained_lora_policy()
    with pytest.raises(KeyError, match="missing"):
        fresh.load_lora(sd)
    with pytest.raises(KeyError, match="unet."):
        fresh.load_lora({"text_encoder.x.lora_A.weight": torch.zeros(4, 4)})


def test_save_pretrained_round_trip(tmp_path, trained_lora_policy):
    policy = trained_lora_policy()
    policy.save_pretrained(tmp_path)
    loaded = MVDreamPolicy.from_pretrained(tmp_path)
    assert loaded.tokenizer.vocab == VOCAB and loaded.elevation == 15.0
    x, t, emb = _inputs(policy)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, emb, 3.0), policy(x, t, emb, 3.0))
        with loaded.disable_adapters(), policy.disable_adapters():
            assert torch.equal(loaded(x, t, emb, 3.0), policy(x, t, emb, 3.0))
    assert torch.equal(loaded.negative_embeds, policy.negative_embeds)


# ---------------------------------------------------------------------------------------------------
# Missing weights

def test_port_folder_parts_load_strictly(tmp_path):
    # The port's vae/ and text_encoder/ go through from_pretrained, which only warns on missing keys.
    from safetensors.torch import load_file, save_file
    text = CLIPTextModel(CLIPTextConfig(**mvdream.tiny_text_config(20, 16)))
    text.save_pretrained(tmp_path)
    loaded = mvdream_weights._from_pretrained_strict(CLIPTextModel, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(text.state_dict().values(), loaded.state_dict().values()))
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop(next(k for k in sd if "final_layer_norm.weight" in k))
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="final_layer_norm"):
        mvdream_weights._from_pretrained_strict(CLIPTextModel, tmp_path)


def test_from_pretrained_offline_names_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="sd-v2.1-base-4view.pt"):
        MVDreamPolicy.from_pretrained("MVDream/MVDream", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="ashawkey/mvdream-sd2.1-diffusers"):
        MVDreamPolicy.from_pretrained("ashawkey/mvdream-sd2.1-diffusers", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="not an MVDream diffusers-port folder"):
        MVDreamPolicy.from_pretrained(tmp_path)
