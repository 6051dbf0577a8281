"""Recovery oracle: Recover Original, on keys made and stored through the nodes, gives what the plain core's
``recover_latent`` gives on the same keys and model, decoded the same way.

The nodes run as ComfyUI's executor runs them (``execute`` under ``torch.inference_mode()``) on the tiny
checkpoint: MSI Invert (lite) → Save Privacy Keys → Load Privacy Keys → Recover Original. The oracle reads the
same key file with ``core.keyfile.load_keys`` and runs ``core.sampling.recover_latent`` on a ComfyBackend of the
same MODEL (the backend test_bridge.py shows to agree with the diffusers one). The two paths differ only in
how the model is called (ComfyUI's sampler stack with the Embedding Scheduler's CONDITIONING vs
``apply_model`` with the stage conditioning picked by the core), so they must agree to float precision.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui

PASSPHRASE = "recovery oracle passphrase (tests)"
INVERSION_STEPS = 4


def _run(node_class, **inputs):
    """One node's ``execute`` as ComfyUI's executor calls it; returns its outputs as a tuple."""
    with torch.inference_mode():
        return node_class.execute(**inputs).args


def receipt_for(bridge, embeds):
    """A receipt for ``embeds`` as Privacy Sampler makes it after a passed gate (this test runs no sampler:
    it checks the key path, test_gate.py the gate)."""
    from core.keys import stage_conds_digest
    from core.report import PrivacyReport

    types = sys.modules[bridge.__name__.rsplit(".", 1)[0] + ".types"]
    report = PrivacyReport(task="anonymize", preset="custom", settings={}, model={}, faces=[], outside_faces=[],
                           seconds=0.0)
    return types.PrivacyReceipt(stage_conds_digest(embeds.stage_conds), embeds.metadata.model_fingerprint, report)


@pytest.fixture(scope="module")
def recovered(comfy_inprocess, tiny_checkpoint):
    import comfy.sd

    nodes_ = comfy_inprocess.node_classes
    bridge = sys.modules[nodes_["DiffPrivacy_Recover"].__module__.rsplit(".", 1)[0] + ".comfy"]
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                 output_clip=True)[:3]
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(11))
    embeds, key_latent = _run(nodes_["DiffPrivacy_MSIInvert"], model=model, clip=clip, vae=vae, image=image,
                              mode="lite", steps=2, learning_rate=5e-3, inversion_steps=INVERSION_STEPS,
                              timesteps_per_step=1, seed=23, official_uint8_quirk=False)
    (path,) = _run(nodes_["DiffPrivacy_SaveKeys"], embeds=embeds, key_latent=key_latent,
                   filename_prefix="oracle", passphrase=PASSPHRASE, allow_plaintext=False,
                   receipt=receipt_for(bridge, embeds))
    loaded_embeds, loaded_latent, _ = _run(nodes_["DiffPrivacy_LoadKeys"], key_file=os.path.basename(path),
                                           passphrase=PASSPHRASE)
    (images,) = _run(nodes_["DiffPrivacy_Recover"], model=model, vae=vae, embeds=loaded_embeds,
                     key_latent=loaded_latent)
    return bridge, model, clip, vae, path, key_latent, images


def test_keys_store_the_scaled_key_latent(recovered):
    """Save/Load Privacy Keys convert key-I with the bridge's SD1.x latent format: the file holds MSI Invert's
    latent as a scaled z_T, and the key_latent it loads is MSI Invert's again."""
    from core.keyfile import load_keys

    bridge, model, _, _, path, key_latent, _ = recovered
    keys = load_keys(path, PASSPHRASE)
    assert keys.metadata.ddim_steps == INVERSION_STEPS
    torch.testing.assert_close(keys.z_T, bridge.models.to_scaled_latent(model, key_latent).cpu())


def test_recover_original_matches_the_core_recovery(recovered):
    from core.keyfile import load_keys
    from core.sampling import recover_latent

    bridge, model, clip, vae, path, _, images = recovered
    keys = load_keys(path, PASSPHRASE)
    with torch.inference_mode():
        backend = bridge.backend.ComfyBackend(model, clip, vae)
        z0 = recover_latent(backend, keys.z_T.to(backend.device), keys.stage_conds.to(backend.device),
                            keys.metadata.ddim_steps)
        oracle = bridge.models.decode_to_images(vae, bridge.models.to_comfy_latent(model, z0)["samples"])
    assert images.shape == oracle.shape == (1, 64, 64, 3)
    assert float(oracle.std()) > 1e-3  # a picture, not a constant
    # the same math through two paths: measured 4.5e-6 apart on the CPU
    torch.testing.assert_close(images.float().cpu(), oracle.float().cpu(), atol=5e-5, rtol=0)


# ------------------------------------------------------------------------------------ effective model
LAYER = "input_blocks.1.1.proj_in.weight"  # any UNet weight; the tiny UNet has this one


def _checkpoint_weights(bridge, model) -> dict:
    """Copies of the checkpoint's own UNet weights: ``model`` (unpatched) is loaded first, since a patched clone
    loaded by an earlier test leaves its patched weights in the shared UNet."""
    bridge.models.load_models(model)
    return {name: tensor.clone() for name, tensor in model.model.diffusion_model.state_dict().items()}


def _lora_clone(model, layer: str = LAYER, scale: float = 1e-2):
    """A MODEL clone with a small 'diff' patch (what a LoRA adds after its up·down product) on one UNet layer,
    added with ComfyUI's own ``ModelPatcher.add_patches``; returns (clone, the patch tensor)."""
    weight = model.model.diffusion_model.state_dict()[layer]
    delta = scale * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    patched = model.clone()
    assert patched.add_patches({"diffusion_model." + layer: ("diff", (delta,))}, 1.0) == ["diffusion_model." + layer]
    return patched, delta


def test_a_lora_patch_changes_the_model_fingerprint(recovered):
    """model_fingerprint hashes the weights the MODEL runs with: a patch on one layer changes it, an unpatched
    clone keeps it, and it is core's unet_fingerprint of the patched weights, before and after ComfyUI loads
    (and so patches) the model."""
    from core.fingerprint import unet_fingerprint

    bridge, model, *_ = recovered
    base = bridge.models.model_fingerprint(model)
    plain = model.clone()
    patched, delta = _lora_clone(model)
    unet = model.model.diffusion_model
    weights = _checkpoint_weights(bridge, model)
    expected = dict(weights, **{LAYER: weights[LAYER] + delta.to(weights[LAYER].dtype)})
    assert bridge.models.model_fingerprint(plain) == base == unet_fingerprint(weights)
    assert bridge.models.model_fingerprint(patched) == unet_fingerprint(expected) != base
    # compute both again with ComfyUI's patched weights in the shared UNet (its backup holds the originals)
    bridge.models.load_models(patched)
    assert torch.equal(unet.state_dict()[LAYER], expected[LAYER])
    model.model.__dict__.pop(bridge.models.FINGERPRINT_CACHE_ATTRIBUTE)
    assert bridge.models.model_fingerprint(patched) == unet_fingerprint(unet.state_dict()) == unet_fingerprint(expected)
    assert bridge.models.model_fingerprint(plain) == base
    bridge.models.load_models(model)
    assert torch.equal(unet.state_dict()[LAYER], weights[LAYER])


def test_the_fingerprint_is_computed_once_per_model_and_patches(recovered, monkeypatch):
    bridge, model, *_ = recovered
    model.model.__dict__.pop(bridge.models.FINGERPRINT_CACHE_ATTRIBUTE, None)
    calls = []
    real = bridge.models.unet_fingerprint
    monkeypatch.setattr(bridge.models, "unet_fingerprint", lambda weights: calls.append(1) or real(weights))
    patched, _ = _lora_clone(model)
    for patcher in (model, model.clone(), model, patched, patched.clone(), patched):
        bridge.models.model_fingerprint(patcher)
    assert len(calls) == 2  # the base model and the one set of patches; clones share patches_uuid


def test_recovery_with_a_patched_model_fails_with_key_mismatch(recovered, comfy_inprocess):
    """Keys made with the plain checkpoint do not recover on the same checkpoint with a LoRA on one layer."""
    _, model, _, vae, path, _, _ = recovered
    embeds, key_latent, _ = _run(comfy_inprocess.node_classes["DiffPrivacy_LoadKeys"], key_file=os.path.basename(path),
                                 passphrase=PASSPHRASE)
    patched, _ = _lora_clone(model)
    with pytest.raises(Exception) as info:
        _run(comfy_inprocess.node_classes["DiffPrivacy_Recover"], model=patched, vae=vae, embeds=embeds,
             key_latent=key_latent)
    assert type(info.value).__name__ == "KeyMismatchError"
    assert embeds.metadata.model_fingerprint in str(info.value)


def test_a_real_lora_through_comfyuis_loader_changes_the_fingerprint(recovered):
    """A kohya-format LoRA on one attention projection, loaded with ComfyUI's own LoRA code: the id is the
    fingerprint of W + (alpha/rank)·up·down, computed in float64 and rounded to the weight's dtype."""
    import comfy.lora
    import comfy.sd

    from core.fingerprint import unet_fingerprint

    bridge, model, *_ = recovered
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora_name, model_key = next((name, key) for name, key in sorted(key_map.items())
                                if name.startswith("lora_unet_") and isinstance(key, str)
                                and key.endswith("attn2.to_k.weight"))
    weights = _checkpoint_weights(bridge, model)
    layer = model_key[len("diffusion_model."):]
    gen = torch.Generator().manual_seed(9)
    rank, alpha = 4, 2.0
    up = 0.05 * torch.randn(weights[layer].shape[0], rank, generator=gen)
    down = 0.05 * torch.randn(rank, weights[layer].shape[1], generator=gen)
    lora = {f"{lora_name}.lora_up.weight": up, f"{lora_name}.lora_down.weight": down,
            f"{lora_name}.alpha": torch.tensor(alpha)}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    assert list(patched.patches) == [model_key]
    expected = dict(weights)
    expected[layer] = (weights[layer].double() + (alpha / rank) * (up.double() @ down.double())).to(weights[layer].dtype)
    fingerprint = bridge.models.model_fingerprint(patched)
    assert fingerprint == unet_fingerprint(expected) != bridge.models.model_fingerprint(model)
