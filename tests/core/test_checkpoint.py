"""core.checkpoint: splitting single-file SD1.x checkpoints and reading diffusers configs off tensor shapes.

Everything runs on meta tensors (shapes only), so the full SD1.5 layout costs no memory.
"""
from __future__ import annotations

import pytest
import torch

from core.checkpoint import (
    kl_vae_config_from_ldm,
    split_checkpoint,
    taesd_to_diffusers,
    unet_config_from_ldm,
)
from core.errors import IncompatibleWeightsError
from tests.support import tiny_diffusers as td


def meta(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_split_checkpoint_strips_the_ldm_prefixes():
    sd = meta(td.tiny_sd15_shapes(vae="kl"))
    sd["model_ema.decay"] = torch.empty((), device="meta")  # belongs to none of the three parts
    unet, vae, text = split_checkpoint(sd)
    assert unet.keys() == td.ldm_unet_shapes().keys()
    assert vae.keys() == td.ldm_kl_vae_shapes(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1).keys()
    assert text.keys() == td.clip_text_shapes(2).keys()
    assert len(unet) + len(vae) + len(text) == len(sd) - 1


def test_full_sd15_layout_converts_exactly():
    """Config inference + diffusers' key conversion on the real SD1.5 layout (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    shapes = td.ldm_unet_shapes(levels=4, num_res_blocks=2, attention_levels=(0, 1, 2), output_attention=True,
                                mid_block=True)
    unet_sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    cfg = unet_config_from_ldm(unet_sd)
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280) and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet_sd.items()}, cfg)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    own = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in converted.items()}
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 859.52) < 0.01

    vae_sd = {k: torch.empty(v, device="meta") for k, v in td.ldm_kl_vae_shapes().items()}
    vcfg = kl_vae_config_from_ldm(vae_sd)
    assert vcfg["block_out_channels"] == (128, 256, 512, 512) and vcfg["layers_per_block"] == 2
    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_sd.items()}, vcfg)
    with torch.device("meta"):
        vae = AutoencoderKL(**vcfg)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == {k: tuple(v.shape) for k, v in converted.items()}


def test_taesd_names_map_onto_autoencoder_tiny():
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        tiny = AutoencoderTiny(latent_channels=4)
    mapped = taesd_to_diffusers(meta(td.taesd_shapes()))  # vae_scale / vae_shift are not module weights
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in tiny.state_dict().items()}


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("input_blocks.0.0.weight"), "No SD UNet"),
    (lambda sd: sd.update({"label_emb.0.0.weight": torch.empty(4, 4, device="meta")}), "SDXL"),
])
def test_unet_config_refuses_other_layouts(edit, match):
    sd = meta(td.ldm_unet_shapes())
    edit(sd)
    with pytest.raises(IncompatibleWeightsError, match=match):
        unet_config_from_ldm(sd)
