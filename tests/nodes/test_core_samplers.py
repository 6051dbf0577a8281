"""The pack's outputs work with ComfyUI's own samplers: the Embedding Scheduler's CONDITIONING with a plain
KSampler, and Identity Energy Guidance's GUIDER with SamplerCustomAdvanced (in-process executor, 64 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import SAVE_IMAGE_TYPES, astronaut_png, load_api, node_ids, tiny

pytestmark = pytest.mark.comfyui


def _front(comfy) -> tuple[dict, dict]:
    """The shipped anonymize graph up to the scheduler and guidance (no sampler, no outputs) + node ids."""
    graph = tiny(load_api("anonymize"), photo=astronaut_png(comfy.input_dir), ckpt=comfy.models.checkpoint_name)
    for kind in ("DiffPrivacy_PrivacySampler", "DiffPrivacy_FacePasteBack", *SAVE_IMAGE_TYPES, "DiffPrivacy_SaveKeys"):
        for node_id in node_ids(graph, kind):
            del graph[node_id]
    ids = {kind: node_ids(graph, kind)[0] for kind in (
        "CheckpointLoaderSimple", "DiffPrivacy_FaceAlign", "CLIPTextEncode", "DiffPrivacy_EmbeddingScheduler",
        "DiffPrivacy_IdentityEnergyGuidance")}
    graph["500"] = {"class_type": "VAEEncode", "inputs": {"pixels": [ids["DiffPrivacy_FaceAlign"], 0],
                                                          "vae": [ids["CheckpointLoaderSimple"], 2]}}
    return graph, ids


def _decode_and_save(graph: dict, ids: dict, latent_ref: list, prefix: str) -> None:
    ckpt = ids["CheckpointLoaderSimple"]
    graph["590"] = {"class_type": "VAEDecode", "inputs": {"samples": latent_ref, "vae": [ckpt, 2]}}
    graph["599"] = {"class_type": "SaveImage", "inputs": {"images": ["590", 0], "filename_prefix": prefix}}


def _pixels(comfy, history) -> np.ndarray:
    (record,) = history["outputs"]["599"]["images"]
    with Image.open(comfy.output_path(record)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _ksampler_run(comfy, positive_ref: list, prefix: str) -> np.ndarray:
    graph, ids = _front(comfy)
    ckpt, null = ids["CheckpointLoaderSimple"], ids["CLIPTextEncode"]
    graph["510"] = {"class_type": "KSampler", "inputs": {
        "model": [ckpt, 0], "seed": 3, "steps": 6, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
        "positive": positive_ref if positive_ref is not None else [null, 0], "negative": [null, 0],
        "latent_image": ["500", 0], "denoise": 0.6}}
    _decode_and_save(graph, ids, ["510", 0], prefix)
    return _pixels(comfy, comfy.run(graph))


def test_plain_ksampler_applies_the_schedule(comfy_inprocess):
    """Scheduled conditioning runs in the stock KSampler, and its stage embeddings change the result compared
    with the null text alone (the schedule's percent ranges are honoured, no gap, no crash)."""
    _, ids = _front(comfy_inprocess)
    scheduled = _ksampler_run(comfy_inprocess, [ids["DiffPrivacy_EmbeddingScheduler"], 0], "ks_scheduled")
    null_only = _ksampler_run(comfy_inprocess, None, "ks_null")
    assert scheduled.shape == null_only.shape == (64, 64, 3)
    assert np.isfinite(scheduled).all()
    assert np.abs(scheduled - null_only).max() > 1e-3


def _guider_run(comfy, step_scale: float, prefix: str) -> np.ndarray:
    graph, ids = _front(comfy)
    ckpt, guidance = ids["CheckpointLoaderSimple"], ids["DiffPrivacy_IdentityEnergyGuidance"]
    graph[guidance]["inputs"].update(model=[ckpt, 0], vae=[ckpt, 2],
                                     conditioning=[ids["DiffPrivacy_EmbeddingScheduler"], 0], step_scale=step_scale,
                                     max_identity_similarity=1.0)
    graph["520"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}}
    graph["521"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["522"] = {"class_type": "BasicScheduler", "inputs": {"model": [ckpt, 0], "scheduler": "ddim_uniform",
                                                               "steps": 6, "denoise": 0.6}}
    graph["523"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["520", 0], "guider": [guidance, 1], "sampler": ["521", 0], "sigmas": ["522", 0],
        "latent_image": ["500", 0]}}
    _decode_and_save(graph, ids, ["523", 0], prefix)
    return _pixels(comfy, comfy.run(graph))


def test_guider_output_drives_sampler_custom_advanced(comfy_inprocess):
    """The GUIDER output works with core SamplerCustomAdvanced, and its guidance changes the result (same
    noise, step_scale 0 vs 100) in the direction of the energy: lower similarity to the source."""
    from core.recognizers import FaceCrop, load_recognizer, reference_embedding

    unguided = _guider_run(comfy_inprocess, 0.0, "guider_off")
    guided = _guider_run(comfy_inprocess, 100.0, "guider_on")
    assert np.abs(guided - unguided).max() > 1e-3

    models = comfy_inprocess.models
    recognizer = load_recognizer(str(models.face_recognition / models.facenet_name), "auto")
    crop = FaceCrop.official(recognizer)
    with Image.open(comfy_inprocess.input_dir / "astronaut.png") as photo:
        from core import faces
        source_photo = torch.from_numpy(np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0)
    aligned = faces.align_face(source_photo, faces.single_face(source_photo), size=64).crop
    to_model = lambda a: torch.as_tensor(a).permute(2, 0, 1).unsqueeze(0) * 2 - 1  # noqa: E731
    ref = reference_embedding(recognizer, crop, to_model(aligned))
    with torch.no_grad():
        sims = [float(torch.nn.functional.cosine_similarity(recognizer(crop(to_model(x))), ref)) for x in
                (unguided, guided)]
    assert sims[1] < sims[0], sims
