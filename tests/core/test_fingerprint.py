"""core.fingerprint: one id per UNet whatever the storage dtype; any change of any weight (a LoRA on one layer)
gives another id; the text encoder has its own id, independent of its name prefix."""
import pytest
import torch

from core.errors import IncompatibleWeightsError
from core.fingerprint import text_encoder_fingerprint, unet_fingerprint


def _unet(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
            "time_embed.0.weight": torch.randn(16, 8, generator=g),
            "out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 12, generator=g),
            "input_blocks.1.0.in_layers.2.weight": torch.randn(8, 8, 3, 3, generator=g),
            "middle_block.1.proj_out.bias": torch.randn(8, generator=g)}


def test_stable_across_storage_dtype_and_key_order():
    sd = _unet(0)
    fp = unet_fingerprint(sd)
    assert fp.startswith("w1:") and len(fp) == 35 and int(fp[3:], 16) >= 0
    assert unet_fingerprint({k: v.half() for k, v in sd.items()}) == fp
    assert unet_fingerprint(dict(reversed(list(sd.items())))) == fp


@pytest.mark.parametrize("name", list(_unet(0)))
def test_a_low_rank_update_of_any_single_layer_changes_it(name):
    """What a LoRA does: W + scale·B·A on one layer, everything else untouched."""
    sd = _unet(0)
    w = sd[name]
    g = torch.Generator().manual_seed(1)
    flat = w.reshape(w.shape[0], -1)
    delta = 0.05 * torch.randn(flat.shape[0], 1, generator=g) @ torch.randn(1, flat.shape[1], generator=g)
    patched = {**sd, name: (flat + delta).reshape(w.shape)}
    assert unet_fingerprint(patched) != unet_fingerprint(sd)


def test_different_models_differ_and_empty_ones_are_refused():
    assert unet_fingerprint(_unet(1)) != unet_fingerprint(_unet(0))
    with pytest.raises(IncompatibleWeightsError, match="no weights"):
        unet_fingerprint({"position_ids": torch.arange(4)})


def test_text_encoder_id_ignores_the_library_prefix():
    g = torch.Generator().manual_seed(2)
    text = {"text_model.embeddings.token_embedding.weight": torch.randn(10, 4, generator=g),
            "text_model.final_layer_norm.weight": torch.randn(4, generator=g),
            "text_model.embeddings.position_ids": torch.arange(77)}
    comfy = {"clip_l.transformer." + k: v for k, v in text.items()}
    assert text_encoder_fingerprint(text) == text_encoder_fingerprint(comfy)
    assert text_encoder_fingerprint({**text, "text_model.final_layer_norm.weight": torch.zeros(4)}) != \
        text_encoder_fingerprint(text)
