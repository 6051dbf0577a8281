"""DiffusersBackend / ClipVisionEncoder on tiny random-weight SD1.5-shaped single-file checkpoints."""
from __future__ import annotations

import pytest
import torch

from core.backend import DiffusionBackend, VisionEncoder
from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend
from core.fingerprint import unet_fingerprint
from core.diffusion import LATENT_SCALE
from core.errors import IncompatibleWeightsError, InvalidImageError, WeightsNotFoundError
from core.weights import read_state_dict
from tests.support import tiny_diffusers as td

TEXT_LAYERS = 2


@pytest.fixture(scope="module")
def tokenizer_dir():
    return td.require_sd1_tokenizer_dir()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp())


def load(path, tokenizer_dir, **kw):
    return DiffusersBackend.from_single_file(path, tokenizer_dir=tokenizer_dir, **kw)


@pytest.fixture(scope="module")
def taesd_ckpt(ckpt_dir):
    return td.tiny_checkpoint(ckpt_dir, 0, vae="taesd", text_layers=TEXT_LAYERS)


@pytest.fixture(scope="module")
def backend(taesd_ckpt, tokenizer_dir):
    return load(taesd_ckpt, tokenizer_dir)


@pytest.fixture(scope="module")
def backend64(taesd_ckpt, tokenizer_dir):
    return load(taesd_ckpt, tokenizer_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def kl_ckpt(ckpt_dir):
    return td.tiny_checkpoint(ckpt_dir, 0, vae="kl", text_layers=TEXT_LAYERS)


@pytest.fixture(scope="module")
def kl_backend(kl_ckpt, tokenizer_dir):
    return load(kl_ckpt, tokenizer_dir)


MULTI_LEVEL = {"levels": 2, "mid_block": True, "model_channels": 32}


@pytest.fixture(scope="module")
def multi_ckpt(ckpt_dir):
    return td.tiny_checkpoint(ckpt_dir, 2, vae="taesd", text_layers=TEXT_LAYERS, **MULTI_LEVEL)


@pytest.fixture(scope="module")
def multi_backend(multi_ckpt, tokenizer_dir):
    return load(multi_ckpt, tokenizer_dir)


def gradient_image(size=64):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([xx, yy, 0.8 * xx * yy]).unsqueeze(0)


# ------------------------------------------------------------------------------------------- denoiser
def test_protocols_and_attributes(backend):
    assert isinstance(backend, DiffusionBackend)
    assert backend.token_dim == 768 and backend.vae_kind == "taesd"
    assert not any(p.requires_grad for m in (backend.unet, backend.vae, backend.text_model) for p in m.parameters())


def test_predict_eps_shape_dtype_finite(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    cond = backend.null_conditioning().expand(3, -1, -1)
    eps = backend.predict_eps(z, t, cond)
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32 and torch.isfinite(eps).all()
    # the timestep matters, and a [1,77,D] cond broadcasts like an expanded one
    assert not torch.allclose(eps[0], backend.predict_eps(z[:1], torch.tensor([999]), cond[:1])[0])
    torch.testing.assert_close(backend.predict_eps(z, t, backend.null_conditioning()), eps)


def test_predict_eps_depends_on_conditioning_and_is_differentiable(backend):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700])
    cond = backend.encode_text("a photo of a face").requires_grad_(True)
    eps = backend.predict_eps(z, t, cond)
    assert (eps - backend.predict_eps(z, t, backend.null_conditioning())).abs().max() > 1e-3
    eps.square().sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradient(backend):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 900])

    def grad():
        cond = backend.null_conditioning().expand(2, -1, -1).clone().requires_grad_(True)
        backend.predict_eps(z, t, cond).square().sum().backward()
        return cond.grad

    plain = grad()
    backend.enable_gradient_checkpointing()
    try:
        assert backend.gradient_checkpointing
        ckpt = grad()
    finally:
        backend.enable_gradient_checkpointing(False)
    torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- VAE
def test_encode_decode_shapes_and_scaling(backend):
    img = gradient_image()
    z = backend.encode_image(img)
    assert z.shape == (1, 4, 8, 8) and z.dtype == torch.float32
    # TAESD convention: z = 0.18215·(encoder(x)/vae_scale + shift); the tiny file stores vae_scale = 0.18215
    raw = backend.vae.encoder(img)
    torch.testing.assert_close(z, raw)
    x = backend.decode_latent(z)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    with pytest.raises(InvalidImageError):
        backend.encode_image(torch.zeros(1, 3, 60, 64))
    with pytest.raises(InvalidImageError):
        backend.encode_image(torch.zeros(3, 64, 64))


def test_decode_is_differentiable(backend):
    z = (0.5 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    backend.decode_latent(z).mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_taesd_scale_is_read_from_the_file(taesd_ckpt, tokenizer_dir, backend):
    # a file with ComfyUI's default vae_scale = 1 treats the raw encoder output as *unscaled* latents
    sd = read_state_dict(taesd_ckpt, what="checkpoint")
    sd["first_stage_model.vae_scale"] = torch.tensor(1.0)
    other = DiffusersBackend.from_state_dict(sd, tokenizer=backend.tokenizer)
    img = gradient_image()
    torch.testing.assert_close(other.encode_image(img), LATENT_SCALE * backend.encode_image(img))
    z = backend.encode_image(img)
    torch.testing.assert_close(other.decode_latent(LATENT_SCALE * z), backend.decode_latent(z))


def test_kl_vae_layout(kl_backend):
    kl = kl_backend
    assert kl.vae_kind == "kl"
    img = gradient_image()
    z = kl.encode_image(img)
    assert z.shape == (1, 4, 8, 8)
    # posterior mean, scaled by 0.18215
    moments = kl.vae.quant_conv(kl.vae.encoder(img))
    torch.testing.assert_close(z, LATENT_SCALE * moments[:, :4])
    zz = z.clone().requires_grad_(True)
    x = kl.decode_latent(zz)
    assert x.shape == (1, 3, 64, 64)
    x.mean().backward()
    assert zz.grad.abs().sum() > 0


def test_decode_gradient_matches_finite_differences(backend64):
    b64 = backend64
    g = torch.Generator().manual_seed(4)
    z = (0.5 * torch.randn(1, 4, 8, 8, generator=g)).double()
    w = torch.randn(1, 3, 64, 64, generator=g).double()
    d = torch.randn(1, 4, 8, 8, generator=g).double()

    def f(zz):
        return (b64.decode_latent(zz).double() * w).sum()

    zz = z.clone().requires_grad_(True)
    f(zz).backward()
    h = 1e-7  # TAESD is piecewise linear (ReLU): a small step keeps the difference off the kinks
    fd = (f(z + h * d) - f(z - h * d)) / (2 * h)
    assert abs(float((zz.grad * d).sum()) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


# ------------------------------------------------------------------------------------------- text
def test_stage_tokens_replace_position_one(backend):
    g = torch.Generator().manual_seed(5)
    tokens = 0.02 * torch.randn(2, 768, generator=g)
    conds = backend.encode_stage_tokens(tokens)
    assert conds.shape == (2, 77, 768) and conds.dtype == torch.float32
    # causal mask: the BOS output cannot see the replaced token; every later position can
    torch.testing.assert_close(conds[0, 0], conds[1, 0])
    assert ((conds[0, 1:] - conds[1, 1:]).abs().amax(dim=-1) > 1e-4).all()


def test_stage_tokens_with_the_star_embedding_is_the_plain_prompt(backend):
    star = backend.token_embedding("*")
    torch.testing.assert_close(backend.encode_stage_tokens(star[None]), backend.encode_text("*"))


def test_stage_tokens_gradient_reaches_tokens(backend):
    tokens = (0.02 * torch.randn(3, 768, generator=torch.Generator().manual_seed(6))).requires_grad_(True)
    backend.encode_stage_tokens(tokens).square().mean().backward()
    assert tokens.grad is not None and (tokens.grad.abs().sum(dim=1) > 0).all()
    with pytest.raises(ValueError):
        backend.encode_stage_tokens(torch.zeros(2, 5))


def test_conditioning_gradient_matches_finite_differences(backend64):
    """The MSI gradient path tokens → CLIP → UNet ε̂, in float64, against a central difference."""
    b64 = backend64
    g = torch.Generator().manual_seed(7)
    tok = (0.02 * torch.randn(1, 768, generator=g)).double()
    d = torch.randn(1, 768, generator=g).double()
    z = torch.randn(1, 4, 8, 8, generator=g).double()
    w = torch.randn(1, 4, 8, 8, generator=g).double()
    t = torch.tensor([650])

    def f(x):
        return (b64.predict_eps(z, t, b64.encode_stage_tokens(x)).double() * w).sum()

    x = tok.clone().requires_grad_(True)
    f(x).backward()
    h = 1e-6
    fd = (f(tok + h * d) - f(tok - h * d)) / (2 * h)
    analytic = float((x.grad * d).sum())
    assert abs(analytic) > 1e-8
    assert abs(analytic - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_null_conditioning_and_token_embedding(backend):
    null = backend.null_conditioning()
    assert null.shape == (1, 77, 768) and null.dtype == torch.float32
    assert backend.null_conditioning() is null  # cached
    torch.testing.assert_close(null, backend.encode_text(""))
    face = backend.token_embedding("face")
    ids = backend.tokenizer("face")["input_ids"]
    assert face.shape == (768,)
    torch.testing.assert_close(face, backend.text_model.token_embedding.weight[ids[1]])
    assert not torch.equal(face, backend.token_embedding("photo"))


# ------------------------------------------------------------------------------------------- loading
def test_fingerprint_stable_across_loads_and_seed_dependent(backend, taesd_ckpt, ckpt_dir, tokenizer_dir):
    fp = backend.model_fingerprint()
    assert isinstance(fp, str) and fp.startswith("w1:")
    assert load(taesd_ckpt, tokenizer_dir).model_fingerprint() == fp
    other = td.tiny_checkpoint(ckpt_dir, 1, vae="taesd", text_layers=TEXT_LAYERS)
    assert load(other, tokenizer_dir).model_fingerprint() != fp
    # the storage dtype does not change the id (values are hashed at float16)
    sd = read_state_dict(taesd_ckpt, what="checkpoint")
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert unet_fingerprint({k: v.float() for k, v in unet.items()}) == fp


def test_ckpt_file_with_nested_state_dict(backend, taesd_ckpt, tmp_path, tokenizer_dir):
    sd = read_state_dict(taesd_ckpt, what="checkpoint")
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, path)
    b2 = load(path, tokenizer_dir)
    assert b2.model_fingerprint() == backend.model_fingerprint()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([321])
    torch.testing.assert_close(b2.predict_eps(z, t, b2.null_conditioning()),
                               backend.predict_eps(z, t, backend.null_conditioning()))


def test_missing_files_raise_weights_not_found(tmp_path, tokenizer_dir, taesd_ckpt):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(WeightsNotFoundError) as err:
        DiffusersBackend.from_single_file(missing, tokenizer_dir=tokenizer_dir)
    assert str(missing) in str(err.value)
    with pytest.raises(WeightsNotFoundError) as err:
        DiffusersBackend.from_single_file(taesd_ckpt, tokenizer_dir=tmp_path)
    assert "vocab.json" in str(err.value)


def test_incompatible_checkpoints(tmp_path, tokenizer_dir, taesd_ckpt):
    from safetensors.torch import save_file

    path = tmp_path / "not_sd.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(IncompatibleWeightsError):
        DiffusersBackend.from_single_file(path, tokenizer_dir=tokenizer_dir)
    # a text encoder with a tensor missing
    sd = read_state_dict(taesd_ckpt, what="checkpoint")
    del sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    broken = tmp_path / "broken_text.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(IncompatibleWeightsError, match="final_layer_norm"):
        DiffusersBackend.from_single_file(broken, tokenizer_dir=tokenizer_dir)


def test_multi_level_unet_with_middle_block(multi_backend):
    b = multi_backend
    assert len(b.unet.down_blocks) == 2 and b.unet.mid_block is not None
    assert b.unet.down_blocks[0].downsamplers is not None and b.unet.up_blocks[0].upsamplers is not None
    eps = b.predict_eps(torch.randn(2, 4, 8, 8), torch.tensor([3, 997]), b.null_conditioning())
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


# ------------------------------------------------------------------------------------------- vs ComfyUI
@pytest.fixture(scope="module")
def comfy_root():
    """The ComfyUI tree the reference subprocess runs in (a missing one skips locally, fails under CI)."""
    return td.require_comfyui_dir()


def test_key_names_match_comfyui(comfy_root, tmp_path):
    ref = td.comfy_key_shapes(str(tmp_path), text_layers=TEXT_LAYERS, kl_ch=32)
    assert ref["unet"] == td.ldm_unet_shapes()
    assert ref["sd15_unet"] == td.ldm_unet_shapes(levels=4, num_res_blocks=2, attention_levels=(0, 1, 2),
                                                  output_attention=True, mid_block=True)
    assert ref["taesd"] == td.taesd_shapes()
    assert ref["kl"] == td.ldm_kl_vae_shapes(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    assert ref["sd15_kl"] == td.ldm_kl_vae_shapes()
    clip = dict(ref["clip"])
    assert clip.pop("text_projection.weight") == (768, 768)  # SD1 checkpoints do not carry it
    assert clip == td.clip_text_shapes(TEXT_LAYERS)


def test_outputs_match_comfyui(comfy_root, backend, taesd_ckpt, kl_backend, kl_ckpt, multi_backend, multi_ckpt,
                               tmp_path):
    """Same checkpoint, same inputs: our UNet ε̂, text conditionings and VAE match ComfyUI's own modules."""
    g = torch.Generator().manual_seed(9)
    inputs = dict(z=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([10, 900]),
                  context=torch.randn(2, 77, 768, generator=g), image=gradient_image(),
                  latent_unscaled=torch.randn(1, 4, 8, 8, generator=g), ids=backend._tokenize("*").cpu(),
                  token=0.02 * torch.randn(768, generator=g))
    cases = [(backend, taesd_ckpt, {}), (kl_backend, kl_ckpt, {}), (multi_backend, multi_ckpt, MULTI_LEVEL)]
    refs = td.comfy_reference([(ckpt, layout) for _, ckpt, layout in cases], inputs, str(tmp_path),
                              text_layers=TEXT_LAYERS)
    close = dict(rtol=1e-4, atol=1e-4)
    for (b, _, _), ref in zip(cases, refs):
        with torch.no_grad():
            torch.testing.assert_close(b.predict_eps(inputs["z"], inputs["t"], inputs["context"]), ref["eps"], **close)
            torch.testing.assert_close(b.encode_text("*"), ref["text"], **close)
            torch.testing.assert_close(b.encode_stage_tokens(inputs["token"][None]), ref["stage"], **close)
            torch.testing.assert_close(b.encode_image(inputs["image"]), LATENT_SCALE * ref["enc_unscaled"], **close)
            torch.testing.assert_close(b.decode_latent(LATENT_SCALE * inputs["latent_unscaled"]), ref["dec"], **close)


# ------------------------------------------------------------------------------------------- vision
def test_clip_vision_from_config_hidden_states():
    enc = ClipVisionEncoder.from_config(td.tiny_vision_config(), seed=0)
    assert isinstance(enc, VisionEncoder)
    hs = enc.hidden_states(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(10)))
    assert len(hs) == 25 and enc.num_hidden_states == 25
    assert all(h.shape == (2, 257, 32) for h in hs)
    assert not torch.allclose(hs[3], hs[24])
    small = ClipVisionEncoder.from_config(td.tiny_vision_config(layers=4), seed=0)
    assert len(small.hidden_states(torch.zeros(1, 3, 224, 224))) == 5


def test_clip_vision_from_file_roundtrip(tmp_path):
    from safetensors.torch import save_file

    src = ClipVisionEncoder.from_config(td.tiny_vision_config(layers=3), seed=1)
    sd = {"vision_model." + k: v.clone() for k, v in src.model.state_dict().items()}
    sd["visual_projection.weight"] = torch.zeros(32, 32)  # full CLIPModel files carry these; ignored
    sd["text_model.final_layer_norm.weight"] = torch.ones(8)
    sd["logit_scale"] = torch.tensor(2.0)
    path = tmp_path / "clip_vision.safetensors"
    save_file(sd, str(path))
    enc = ClipVisionEncoder.from_file(path, config=td.tiny_vision_config(layers=3))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    for a, b in zip(enc.hidden_states(x), src.hidden_states(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(IncompatibleWeightsError):  # the default ViT-L/14 config does not fit these weights
        ClipVisionEncoder.from_file(path)
    with pytest.raises(WeightsNotFoundError):
        ClipVisionEncoder.from_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(IncompatibleWeightsError):
        ClipVisionEncoder.from_file(bad)
