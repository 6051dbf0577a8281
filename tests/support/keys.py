"""Shared helpers for the recovery-key tests (tests/core/test_keys.py and tests/core/test_keyfile.py)."""
from __future__ import annotations

import pytest
import torch

from core.keys import KeyMetadata, PrivacyKeys


def make_keys(dim: int = 16, latent: tuple[int, int] = (8, 8), seed: int = 0, batch: int = 1) -> PrivacyKeys:
    """A seeded key set: 10 stages of width ``dim``, z_T [batch, 4, *latent], fixed metadata."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(10, dim, generator=g)
    conds = torch.randn(10, 77, dim, generator=g)
    z = torch.randn(batch, 4, *latent, generator=g)
    # Values whose bits a careless float conversion would change.
    tokens[0, :4] = torch.tensor([-0.0, 1e-40, 3.4e38, -1.1754944e-38])
    meta = KeyMetadata(
        model_fingerprint="a1b2c3d4e5f6",
        ddim_steps=50,
        schedule="recover",
        msi_mode="faithful",
        image_size=(latent[0] * 8, latent[1] * 8),
        created="2024-05-01T12:00:00+00:00",
        extra={"note": "test", "ünïcode": "ok"},
    )
    return PrivacyKeys(tokens, conds, z, meta)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of ``t`` as int32 (so -0.0 and denormals compare exactly)."""
    return t.detach().to("cpu", torch.float32).contiguous().view(torch.int32)


def assert_same_keys(a: PrivacyKeys, b: PrivacyKeys) -> None:
    """``b`` holds float32 CPU tensors bit-identical to ``a``'s (after a float32 cast) and equal metadata."""
    for name in ("stage_tokens", "stage_conds", "z_T"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == torch.float32 and y.device.type == "cpu"
        assert x.shape == y.shape
        assert torch.equal(bits(x), bits(y)), name
    assert a.metadata == b.metadata


def raises_exactly(cls, match: str | None = None):
    """pytest.raises that also rejects subclasses/siblings: the exact type is part of the contract."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(cls, match=match)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._cm.__exit__(*exc)
            assert type(self.info.value) is cls, f"expected {cls.__name__}, got {type(self.info.value).__name__}"
            return handled

    return _Ctx()
