"""core.fingerprint: one id per UNet, whatever the storage dtype, different for different weights."""
import pytest
import torch

from core.errors import IncompatibleWeightsError
from core.fingerprint import unet_fingerprint


def _unet(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
            "time_embed.0.weight": torch.randn(16, 8, generator=g),
            "out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 12, generator=g),
            "input_blocks.1.0.in_layers.2.weight": torch.randn(8, 8, 3, 3, generator=g)}


def test_stable_across_storage_dtype_and_unrelated_tensors():
    sd = _unet(0)
    fp = unet_fingerprint(sd)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert unet_fingerprint({k: v.half() for k, v in sd.items()}) == fp
    assert unet_fingerprint({**sd, "input_blocks.1.0.in_layers.2.weight": torch.zeros(8, 8, 3, 3)}) == fp


def test_changes_with_the_weights_and_needs_its_tensors():
    sd = _unet(0)
    assert unet_fingerprint(_unet(1)) != unet_fingerprint(sd)
    changed = dict(sd)
    changed["out.2.weight"] = sd["out.2.weight"] + 1e-2
    assert unet_fingerprint(changed) != unet_fingerprint(sd)
    del changed["time_embed.0.weight"]
    with pytest.raises(IncompatibleWeightsError, match="time_embed"):
        unet_fingerprint(changed)
