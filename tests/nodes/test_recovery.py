"""Recovery oracle: Recover Original, on keys made and stored through the nodes, gives what the plain core's
``recover_latent`` gives on the same keys and model, decoded the same way.

The nodes run as ComfyUI's executor runs them (``execute`` under ``torch.inference_mode()``) on the tiny
checkpoint: MSI Invert (lite) → Save Privacy Keys → Load Privacy Keys → Recover Original. The oracle reads the
same key file with ``core.keys.load_keys`` and runs ``core.sampling.recover_latent`` on a ComfyBackend of the
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
                   filename_prefix="oracle", passphrase=PASSPHRASE, allow_plaintext=False)
    loaded_embeds, loaded_latent = _run(nodes_["DiffPrivacy_LoadKeys"], key_file=os.path.basename(path),
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
