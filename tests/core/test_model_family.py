"""core.model_family: every family is named from its tensor names and shapes, and refused before any work with a
message that says what it is and what to load instead. The tiny layouts carry the real key names of each family
(tests/support/model_families.py)."""
from __future__ import annotations

import pytest
import torch

from core.errors import IncompatibleWeightsError, UnsupportedModelError
from core.model_family import FAMILIES, ModelFamily, check_supported, classify_state_dict
from tests.support import model_families as mf

EXPECTED = {  # builder → (family key, words its evidence must contain)
    "sd1": ("sd1", "4 input channels"),
    "sd1-inpaint": ("sd1-inpaint", "9 input channels"),
    "sd1-edit": ("sd1-edit", "8 input channels"),
    "sd1-v": ("sd1-v", "v_pred"),
    "sd2": ("sd2", "1024-wide"),
    "sd2-inpaint": ("sd2", "inpainting"),
    "sdxl": ("sdxl", "2048-wide"),
    "sdxl-refiner": ("sdxl-refiner", "1280-wide"),
    "sd3": ("sd3", "joint blocks"),
    "flux": ("flux", "double/single"),
    "flux-transformer-only": ("flux", "on its own"),
    "video": ("video", "temporal"),
    "unet-only": ("unet-only", "Stable Diffusion 1.x"),
    "lora": ("lora", "lora"),
    "vae": ("vae", "autoencoder"),
    "text-encoder": ("text-encoder", "text-encoder"),
    "embedding": ("embedding", "embedding"),
    "foreign": ("unknown", "conv1.weight"),
}


@pytest.mark.parametrize("builder", sorted(mf.BUILDERS))
def test_each_layout_is_named(builder):
    key, evidence = EXPECTED[builder]
    shapes = mf.BUILDERS[builder]()
    family = classify_state_dict(shapes)
    assert family.key == key and evidence in family.evidence, family
    # tensors (meta or real) classify like their shapes
    assert classify_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()}) == family


def test_only_sd1_text_to_image_passes():
    assert [k for k, info in FAMILIES.items() if info.supported] == ["sd1"]
    check_supported(classify_state_dict(mf.sd1()), "x")
    check_supported(classify_state_dict(mf.sd1(model_channels=32)), "x")  # a tiny test layout is still SD 1.x


@pytest.mark.parametrize("builder", sorted(set(mf.BUILDERS) - {"sd1"}))
def test_refusals_name_the_family_and_what_to_load(builder):
    family = classify_state_dict(mf.BUILDERS[builder]())
    with pytest.raises(UnsupportedModelError) as info:
        check_supported(family, "--checkpoint 'x.safetensors'")
    message = str(info.value)
    assert message.startswith(f"--checkpoint 'x.safetensors' is {FAMILIES[family.key].name} ({family.evidence})")
    assert "Stable Diffusion 1.x text-to-image" in message and "v1-5-pruned-emaonly" in message
    assert info.value.family == family.key
    assert isinstance(info.value, IncompatibleWeightsError)  # callers catching the older class still do


def test_unknown_family_keys_are_a_programming_error():
    with pytest.raises(ValueError):
        ModelFamily("sd4")


def test_missing_parts_are_not_a_family():
    """An SD 1.x file without VAE or text encoder is still SD 1.x: the loader names the missing part."""
    assert classify_state_dict(mf.sd1(vae=False)).key == "sd1"
    assert classify_state_dict(mf.sd1(text=False)).key == "sd1"
    assert classify_state_dict({}).key == "unknown"


@pytest.mark.parametrize("builder, words", [
    ("sdxl", "Stable Diffusion XL"), ("sd2", "Stable Diffusion 2.x"), ("sd1-inpaint", "inpainting"),
    ("flux", "Flux"), ("lora", "LoRA"),
])
def test_the_backend_checks_the_family_before_the_parts(builder, words):
    """The issue's order bug: SDXL and SD2 files (which have no cond_stage_model.transformer.*) got "has no CLIP text
    encoder". The family check runs first, on names only, before any module is built."""
    from core.diffusers_backend import DiffusersBackend

    sd = mf.zeros(mf.BUILDERS[builder]())
    with pytest.raises(UnsupportedModelError, match=words) as info:
        DiffusersBackend.from_state_dict(sd, tokenizer=None, source="The checkpoint 'x'")
    assert "no CLIP text encoder" not in str(info.value) and str(info.value).startswith("The checkpoint 'x' is ")


@pytest.mark.parametrize("part, words", [("vae", "has no VAE"), ("text", "has no CLIP text encoder")])
def test_the_backend_names_a_missing_part_of_an_sd1_file(part, words):
    from core.diffusers_backend import DiffusersBackend

    sd = mf.zeros(mf.sd1(model_channels=32, **{part: False}))
    with pytest.raises(IncompatibleWeightsError, match=words) as info:
        DiffusersBackend.from_state_dict(sd, tokenizer=None, source="The checkpoint 'x'")
    assert not isinstance(info.value, UnsupportedModelError)
