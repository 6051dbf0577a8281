"""Identity guidance, run through the nodes in ComfyUI's executor, moves the recognizer in the right direction.

For each task the shipped workflow runs twice with the same seed: guided, and unguided (step_scale 0). The
Privacy Sampler's decoded faces are then embedded with the same FaceNet file and the same crop the guidance
used ("official" for FaceNet: the whole image resized to 160 px), and compared with the embedding of the
aligned source. Anonymize must lower the mean cosine similarity to the source, hide must raise it.

The checkpoint, the UNet and TAESD have random weights, so the energy's gradient is far weaker than with
real models: the test raises step_scale to STEP_SCALE (the shipped value is 1, the widget maximum 100).
Everything is seeded, so the runs are deterministic.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import SIZE, astronaut_png, load_api, node_ids, save_image_ids, set_inputs, tiny

pytestmark = pytest.mark.comfyui

STEP_SCALE = 100.0  # the widget maximum


def _with_sampler_preview(graph: dict, prefix: str) -> dict:
    """Add a SaveImage on the Privacy Sampler's aligned faces (before paste-back), drop the other outputs."""
    (sampler,) = node_ids(graph, "DiffPrivacy_PrivacySampler")
    for node_id in save_image_ids(graph) + node_ids(graph, "DiffPrivacy_SaveKeys"):
        del graph[node_id]
    for node_id in node_ids(graph, "DiffPrivacy_FacePasteBack"):
        del graph[node_id]
    graph["900"] = {"class_type": "SaveImage", "inputs": {"images": [sampler, 0], "filename_prefix": prefix}}
    return graph


def _faces(comfy, history) -> torch.Tensor:
    """The saved faces as [B,3,H,W] in [-1,1]."""
    arrays = []
    for record in history["outputs"]["900"]["images"]:
        with Image.open(comfy.output_path(record)) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def judge(comfy_inprocess):
    """cos(FaceNet(crop(faces)), FaceNet(crop(aligned source))) → [B], the guidance's own recognizer and crop."""
    from skimage import data

    from core import faces as face_ops
    from core.recognizers import FaceCrop, load_recognizer, reference_embedding

    recognizer = load_recognizer(str(comfy_inprocess.models.face_recognition / comfy_inprocess.models.facenet_name),
                                 "auto").eval()
    crop = FaceCrop.official(recognizer)
    photo = torch.from_numpy(data.astronaut()).float() / 255.0
    aligned = face_ops.align_face(photo, face_ops.single_face(photo), size=SIZE).crop
    source = aligned.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0
    with torch.no_grad():
        ref = reference_embedding(recognizer, crop, source)

    def similarities(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = recognizer(crop(images))
        return torch.nn.functional.cosine_similarity(f, ref.reshape(1, -1).to(f.dtype), dim=-1)

    return similarities


def _mean_similarity(comfy, judge, task: str, step_scale: float, target: str = "x0") -> float:
    photo = astronaut_png(comfy.input_dir)
    prefix = f"dir_{task}_{int(step_scale)}_{target}"
    graph = tiny(load_api(task), photo=photo, ckpt=comfy.models.checkpoint_name, sampler_steps=4,
                 batch_size=2 if task == "anonymize" else None)
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", step_scale=step_scale, max_identity_similarity=1.0,
               gradient_target=target)
    history = comfy.run(_with_sampler_preview(graph, prefix))
    return float(judge(_faces(comfy, history)).mean())


@pytest.mark.parametrize("task, sign", [("anonymize", -1.0), ("hide", 1.0)])
def test_guidance_moves_similarity(comfy_inprocess, judge, task, sign):
    unguided = _mean_similarity(comfy_inprocess, judge, task, 0.0)
    guided = _mean_similarity(comfy_inprocess, judge, task, STEP_SCALE)
    # measured with the seeded test models: anonymize 0.411 → 0.406, hide 0.378 → 0.386 (the random TAESD
    # decoder passes only a weak gradient, hence STEP_SCALE); deterministic, so a margin of 1e-3 is safe
    print(f"{task}: mean cosine to source unguided {unguided:.4f}, guided {guided:.4f}")
    assert sign * (guided - unguided) > 1e-3, (task, unguided, guided)


def test_guidance_through_the_unet(comfy_inprocess, judge):
    """gradient_target "xt" differentiates through ComfyUI's UNet inside its sampler stack (weights reach
    autograd through clone wrappers) and still pushes anonymization away from the source."""
    unguided = _mean_similarity(comfy_inprocess, judge, "anonymize", 0.0, "xt")
    guided = _mean_similarity(comfy_inprocess, judge, "anonymize", STEP_SCALE, "xt")
    print(f"anonymize (xt): mean cosine to source unguided {unguided:.4f}, guided {guided:.4f}")
    assert guided < unguided - 1e-3, (unguided, guided)
