"""core.text_encoder: our CLIP text forward equals transformers' and differentiates w.r.t. the placeholder."""
import pytest
import torch

from core.errors import IncompatibleWeightsError
from core.text_encoder import CLIPTextEncoder, PlaceholderConditioner
from tests.support.prerequisites import require_module

transformers = require_module("transformers", "a dependency of diffusers; run scripts/setup_env.sh")


def _hf_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=298, eos_token_id=299, pad_token_id=299)
    model = transformers.CLIPTextModel(cfg).eval()
    for p in model.parameters():  # transformers' init leaves LayerNorms at identity; randomise everything
        p.data.normal_(0, 0.2)
    return model


def _ids():
    ids = torch.full((1, 77), 299, dtype=torch.long)
    ids[0, 0], ids[0, 1], ids[0, 2] = 298, 17, 299
    return ids


def test_matches_transformers_forward():
    hf = _hf_model()
    ours = CLIPTextEncoder.from_state_dict(hf.state_dict(), heads=4)
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (1, 77, 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prefixed_names_load_and_bad_dict_rejected():
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in _hf_model().state_dict().items()}
    CLIPTextEncoder.from_state_dict(sd)
    with pytest.raises(IncompatibleWeightsError):
        CLIPTextEncoder.from_state_dict({"foo.weight": torch.zeros(3)})


def test_placeholder_replaces_only_its_position_and_is_differentiable():
    hf = _hf_model()
    enc = CLIPTextEncoder.from_state_dict(hf.state_dict(), heads=4)
    cond = PlaceholderConditioner(enc, _ids()[0], position=1)
    tokens = torch.randn(2, 64, requires_grad=True)
    out = cond(tokens)
    assert out.shape == (2, 77, 64)
    # causal mask: BOS output cannot see the placeholder; every later position can
    torch.testing.assert_close(out[0, 0], out[1, 0])
    assert (out[0, 1:] - out[1, 1:]).abs().max() > 1e-3
    # the placeholder row equals the plain forward with that embedding substituted
    with torch.no_grad():
        ref = enc.token_embedding(_ids())
        ref[0, 1] = tokens[0]
        torch.testing.assert_close(out[0], enc.forward_embeddings(ref)[0], atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_works_when_weights_come_from_inference_mode():
    with torch.inference_mode():
        sd = {k: v.clone() for k, v in _hf_model().state_dict().items()}
        enc = CLIPTextEncoder.from_state_dict(sd)
    cond = PlaceholderConditioner(enc, _ids()[0])
    tokens = torch.randn(1, 64, requires_grad=True)
    (g,) = torch.autograd.grad(cond(tokens).sum(), tokens)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
