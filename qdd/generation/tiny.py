"""Tiny random-init pipelines of every registered generator, built offline from configs.

Tests and ``qdd-cli demo`` save them with ``save_pretrained`` and load them back through
the same ``--model-path DIR`` path a real checkpoint takes. Every width is a multiple of 32
so that the 4-bit block formats (16, 32, 64 elements) divide every Linear layer, as in the
real models. The VAEs downsample by 4 (not 8): a 64² image has a 16² latent, cheap on a CPU
also in float16/bfloat16, whose convolutions have no fast CPU kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdd.generation.registry import get_generator

#: Text width of the tiny CLIP encoders and of the tiny T5.
CLIP_WIDTH = 32
T5_WIDTH = 64
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def clip_tokenizer() -> Any:
    """A byte-level CLIP tokenizer with no merges: every byte is a token, nothing is unknown."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [f"{s}</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over characters and a few words, built in code (no .model file)."""
    from transformers import T5Tokenizer

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/")
    words = "a an the of in on with and at by to from for under over".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [(f"\u2581{c}", -3.0) for c in chars]
    pieces += [(f"\u2581{w}", -1.0) for w in words if len(w) > 1]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = T5_MAX_LENGTH
    return tokenizer


def _clip_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=2 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_ff=2 * T5_WIDTH,
        d_kv=16,
        num_heads=4,
        num_layers=1,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, flow: bool) -> Any:
    from diffusers import AutoencoderKL

    extra = (
        {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609}
        if flow
        else {}
    )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),  # narrow at full resolution: half convs are slow on CPU
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.5 if flow else 0.18215,
        **extra,
    )


def _sd_components(name: str) -> dict[str, Any]:
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    v2 = name == "sd21"
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=CLIP_WIDTH,
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
        upcast_attention=v2,
        norm_num_groups=32,
    )
    schedule = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    if v2:
        scheduler = DDIMScheduler(
            **schedule, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
        )
    else:
        scheduler = PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(4, flow=False),
        "text_encoder": CLIPTextModel(_clip_config(tokenizer)),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sdxl_components() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    time_dim = 16  # 6 size/crop numbers x 16 + the 32 pooled text: 128 input features
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=CLIP_WIDTH + 6 * time_dim,
        cross_attention_dim=2 * CLIP_WIDTH,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _vae(4, flow=False),
        "text_encoder": CLIPTextModel(_clip_config(tokenizer)),
        "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tokenizer)),
        "tokenizer_2": clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _sd3_components(name: str) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2 if name == "sd35-medium" else 1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=64,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=32,
        qk_norm=None if name == "sd3" else "rms_norm",
        dual_attention_layers=(0,) if name == "sd35-medium" else (),
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _vae(4, flow=True),
        "text_encoder": CLIPTextModelWithProjection(_clip_config(tokenizer)),
        "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tokenizer)),
        "tokenizer_2": clip_tokenizer(),
        "text_encoder_3": _t5_encoder(t5_tok),
        "tokenizer_3": t5_tok,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux_components(name: str) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    dev = name == "flux-dev"
    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=32,  # 8 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=dev,
        axes_dims_rope=(4, 4, 8),
    )
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": _vae(8, flow=True),
        "text_encoder": CLIPTextModel(_clip_config(tokenizer)),
        "tokenizer": tokenizer,
        "text_encoder_2": _t5_encoder(t5_tok),
        "tokenizer_2": t5_tok,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_components(generator: str) -> dict[str, Any]:
    """The pipeline's constructor arguments, random-init from the global torch RNG."""
    spec = get_generator(generator)
    if spec.family == "sd":
        return _sd_components(spec.name)
    if spec.family == "sdxl":
        return _sdxl_components()
    if spec.family == "sd3":
        return _sd3_components(spec.name)
    if spec.family == "flux":
        return _flux_components(spec.name)
    raise ValueError(f"no tiny builder for family {spec.family!r}")


def build_tiny_pipeline(generator: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a deterministic random-init tiny pipeline of ``generator`` into ``out_dir``."""
    import diffusers
    import torch

    spec = get_generator(generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = tiny_components(spec.name)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # configs build modules in train mode: T5 dropout would be random
    pipeline = getattr(diffusers, spec.pipeline_class)(**components)
    out = Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out
