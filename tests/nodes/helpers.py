"""Shared helpers of the node tests: the shipped workflows, a UI → API converter and small graph edits.

The converter maps a UI-format (0.4) workflow to ComfyUI's API ("prompt") format using the live node
definitions (``/object_info`` or :func:`object_info_inprocess`), the same information the frontend uses:
widget values are taken in the order of the node's widget inputs (required, then optional), skipping
socket-only inputs, with the extra control value after a ``control_after_generate`` widget and the upload
button value after an ``image_upload`` widget. Optional widgets past the end of a node's saved values (added to
the node after the file was saved) are left out, as the API files leave them out: both get the default.
"""
from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
WORKFLOW_NAMES = ("anonymize", "hide", "recover", "protect_faces_quick")

#: the shipped workflows read their passphrase from this variable; set before any server starts
PASSPHRASE_ENV = "DIFF_PRIVACY_PASSPHRASE"
TEST_PASSPHRASE = "correct horse battery staple (tests)"
os.environ.setdefault(PASSPHRASE_ENV, TEST_PASSPHRASE)

#: frontend-only node types: no backend class, absent from the API format
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SIZE = 64  # every test runs at 64 px
#: the image-saving nodes of the shipped workflows: ComfyUI's (recover) and the pack's metadata-free one
SAVE_IMAGE_TYPES = ("SaveImage", "DiffPrivacy_SaveImageClean")


# ------------------------------------------------------------------------------------------- files
def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def astronaut_png(folder: Path, name: str = "astronaut.png") -> str:
    """Write scikit-image's astronaut photo (one face) as PNG into ``folder``; return the file name."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(Path(folder) / name)
    return name


def coffee_png(folder: Path, name: str = "coffee.png") -> str:
    """scikit-image's coffee cup (no face) as PNG into ``folder``."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.coffee()).save(Path(folder) / name)
    return name


def png_info(data: bytes) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of image bytes, after a full decode."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format, image.size


# ----------------------------------------------------------------------------------- node definitions
def object_info_inprocess(node_classes: dict, class_types) -> dict:
    """``/object_info`` entries (input, input_order, output) for ``class_types`` from loaded node classes."""
    from comfy_api.latest._io import _ComfyNodeInternal  # only importable inside ComfyUI

    info = {}
    for name in class_types:
        cls = node_classes[name]
        if issubclass(cls, _ComfyNodeInternal):
            info[name] = cls.GET_NODE_INFO_V1()
        else:
            inputs = cls.INPUT_TYPES()
            info[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                          "output": list(cls.RETURN_TYPES)}
    return info


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_names(info: dict) -> list[tuple[str, dict]]:
    """[(input name, options)] of the widget inputs of one node definition, in widget order."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if _is_widget(spec):
                out.append((name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format graph of a UI-format (0.4) workflow. Muted/bypassed and frontend-only nodes are left out."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        optional = set(info["input"].get("optional", {}))
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        pos = 0
        for name, options in widget_names(info):
            if pos >= len(values) and name in optional:
                continue  # an optional widget added after the file was saved: the frontend uses its default
            if pos >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
            inputs[name] = values[pos]
            pos += 1
            if options.get("control_after_generate"):
                pos += 1  # "fixed" / "randomize" / ...
            if options.get("image_upload"):
                pos += 1  # the upload button's value
        if pos != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {pos}")
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, origin, origin_slot, target, _, _ = links[slot["link"]]
            assert target == node["id"]
            inputs[slot["name"]] = [str(origin), origin_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return api


def without_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


# ------------------------------------------------------------------------------------------ editing
def node_ids(graph: dict, class_type: str) -> list[str]:
    return [k for k, v in graph.items() if v["class_type"] == class_type]


def set_inputs(graph: dict, class_type: str, **values) -> dict:
    """Set widget values on every node of ``class_type`` (the graph is edited in place and returned)."""
    ids = node_ids(graph, class_type)
    assert ids, f"no {class_type} node in the graph"
    for node_id in ids:
        for name, value in values.items():
            assert name in graph[node_id]["inputs"], f"{class_type} has no input {name!r}"
            graph[node_id]["inputs"][name] = value
    return graph


def tiny(graph: dict, *, photo: str, ckpt: str, msi_steps: int = 2, inversion_steps: int = 4,
         sampler_steps: int | None = None, batch_size: int | None = None, prefix: str | None = None) -> dict:
    """A copy of a shipped API graph made cheap for CPU tests: 64 px, few MSI/inversion/sampler steps.

    Everything else stays as shipped. ``sampler_steps`` None keeps the DDIM grid but the tests keep it
    small through ``strength`` being applied to it (e.g. 8 steps at strength 0.6 → 4 denoising steps).
    """
    g = copy.deepcopy(graph)
    for node_id in node_ids(g, "CheckpointLoaderSimple"):
        g[node_id]["inputs"]["ckpt_name"] = ckpt
    for node_id in node_ids(g, "LoadImage"):
        g[node_id]["inputs"]["image"] = photo
    if node_ids(g, "DiffPrivacy_FaceAlign"):
        set_inputs(g, "DiffPrivacy_FaceAlign", size=SIZE)
    if node_ids(g, "DiffPrivacy_MSIInvert"):
        set_inputs(g, "DiffPrivacy_MSIInvert", steps=msi_steps, inversion_steps=inversion_steps)
    if node_ids(g, "DiffPrivacy_ProtectFaces"):
        set_inputs(g, "DiffPrivacy_ProtectFaces", size=SIZE, msi_steps=msi_steps, inversion_steps=inversion_steps,
                   steps=sampler_steps or 8, batch_size=batch_size or 1)
    if node_ids(g, "DiffPrivacy_PrivacySampler"):
        if sampler_steps is not None:
            set_inputs(g, "DiffPrivacy_PrivacySampler", steps=sampler_steps)
        if batch_size is not None:
            set_inputs(g, "DiffPrivacy_PrivacySampler", batch_size=batch_size)
    if prefix is not None:
        for node_id in save_image_ids(g):
            g[node_id]["inputs"]["filename_prefix"] = prefix
    return g


def preview_ids(graph: dict) -> list[str]:
    """Ids of the graph's PreviewImage nodes (Face Align's numbered faces in the shipped protect workflows):
    output nodes too, so a graph meant to have one output drops them."""
    return node_ids(graph, "PreviewImage")


def save_image_ids(graph: dict) -> list[str]:
    """Ids of the graph's image-saving nodes (:data:`SAVE_IMAGE_TYPES`)."""
    return [k for k, v in graph.items() if v["class_type"] in SAVE_IMAGE_TYPES]


def saved_images(history: dict, graph: dict) -> list[dict]:
    """Image records written by the graph's image-saving nodes, in node order."""
    out = []
    for node_id in save_image_ids(graph):
        out += history["outputs"].get(node_id, {}).get("images", [])
    return out


def as_uint8(pixels) -> np.ndarray:
    return np.asarray(pixels, dtype=np.uint8)


# ------------------------------------------------------------------------------------ identity judge
def saved_latent(comfy, history: dict, node_id: str):
    """The LATENT tensor a SaveLatent node ``node_id`` wrote (ComfyUI's latent scale), as a CPU tensor."""
    from safetensors.torch import load_file

    (record,) = history["outputs"][node_id]["latents"]
    return load_file(str(comfy.output_path(record)))["latent_tensor"]


def identity_judge(comfy):
    """ComfyUI latent [B,4,h,w] → cosine similarity [B] to the aligned astronaut, as identity guidance sees it.

    Decodes with ComfyUI's own VAE module loaded from the test checkpoint, *without* the [0, 1] clamp of
    ``VAE.decode`` (the guidance differentiates the unclamped decode; the tiny checkpoint's random TAESD
    decodes faces to about [−1.3, −0.6], so clamped images hide most of what the guidance changes), then
    embeds with the test FaceNet file and its official crop, like the guidance does. The reference is the
    astronaut's face aligned at SIZE px, the source the shipped graphs guide with.
    """
    import comfy.sd as comfy_sd  # (bound under another name: ``comfy`` is this function's argument)
    import torch
    from skimage import data

    from core import faces as face_ops
    from core.recognizers import FaceCrop, load_recognizer, reference_embedding

    models = comfy.models
    recognizer = load_recognizer(str(models.face_recognition / models.facenet_name), "auto").eval()
    crop = FaceCrop.official(recognizer)
    photo = torch.from_numpy(data.astronaut()).float() / 255.0
    aligned = face_ops.align_face(photo, face_ops.single_face(photo), size=SIZE).crop
    source = aligned.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0
    with torch.inference_mode():
        vae = comfy_sd.load_checkpoint_guess_config(str(models.checkpoints / models.checkpoint_name),
                                                    output_vae=True, output_clip=False, output_model=False)[2]
        ref = reference_embedding(recognizer, crop, source)
    decoder = vae.first_stage_model

    def similarities(latent):
        with torch.inference_mode():
            dtype = next(decoder.parameters()).dtype
            images = decoder.decode(latent.to(dtype)).float()
            f = recognizer(crop(images))
        return torch.nn.functional.cosine_similarity(f, ref.reshape(1, -1).to(f.dtype), dim=-1)

    return similarities


def assert_identity_shift(label: str, unguided, guided, sign: float, *, min_mean: float, max_wrong_way: int) -> None:
    """Paired per-sample similarities: sign·(guided − unguided) must average ≥ ``min_mean`` with at most
    ``max_wrong_way`` samples ≤ 0. The measured values are printed and carried in the assertion message."""
    shift = sign * (guided - unguided)
    wrong_way = int((shift <= 0).sum())
    fmt = lambda t: "[" + ", ".join(f"{v:.4f}" for v in t.tolist()) + "]"  # noqa: E731
    report = (f"{label}: cosine to source unguided {fmt(unguided)}, guided {fmt(guided)}; shift in the "
              f"expected direction {fmt(shift)}, mean {float(shift.mean()):.4f}, {wrong_way} the wrong way "
              f"(need mean ≥ {min_mean} and ≤ {max_wrong_way} the wrong way)")
    print(report)
    assert float(shift.mean()) >= min_mean and wrong_way <= max_wrong_way, report


# ------------------------------------------------------------------------------------------ every face
def face_masks(photo):
    """Every detected face of ``photo`` [H,W,3] (reading order, core.selection.plan_faces) and its paste mask
    [H,W] at the tests' crop size → (plan, masks)."""
    from core import faces
    from core.selection import plan_faces

    plan = plan_faces(photo)
    return plan, [faces.source_mask(faces.align_face(photo, f.detection, size=SIZE)) for f in plan.faces]


def assert_every_face_changed_and_nothing_else(images, photo, faces_expected: int):
    """Each protected photo of ``images`` changed inside every face's paste mask (mean |Δ| > 0.02) and is
    bit-identical to ``photo`` wherever no face mask reaches. Returns (plan, union of the masks)."""
    import torch

    plan, masks = face_masks(photo)
    assert len(plan.faces) == faces_expected
    union = torch.stack(masks).amax(dim=0)
    for image in images:
        assert torch.equal(image[union == 0], photo[union == 0])
        for number, mask in enumerate(masks, start=1):
            inside = mask == 1
            assert (image[inside] - photo[inside]).abs().mean() > 0.02, f"face {number} unchanged"
    return plan, union


def offer_taesd(monkeypatch, folder) -> None:
    """Random-weight SD1 TAESD files in ``folder``, offered to ComfyUI as its models/vae_approx for one test (Load
    VAE then lists "taesd"); the folder map and the file-list cache are restored afterwards."""
    import folder_paths

    from tests.support import tiny_diffusers as td

    td.write_taesd_files(folder, seed=9)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx",
                        ([str(folder)], folder_paths.folder_names_and_paths["vae_approx"][1]))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
