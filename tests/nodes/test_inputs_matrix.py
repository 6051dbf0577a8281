"""The bad-input matrix (tests/support/input_matrix.py) through ComfyUI: in this process and through the server.

Nodes path, in process (``comfy_inprocess``), each row stopping at the stage that decides it:

* photos: ComfyUI's own Load Image on the file in the input folder, then what Face Align does before and while
  detecting (``rgb``, ``check_size``; Face Align itself where the picture decides); the decoded pixels are compared
  with the row's upright reference;
* checkpoints: ComfyUI's own Load Checkpoint on the file in the checkpoints folder, then the checks MSI Invert runs
  first (``check_model``, ``check_vae``, ``check_clip`` of the bridge); SDXL/SD3/Flux rows use a MODEL ComfyUI builds
  for that family on the meta device (their real UNets are gigabytes, and ComfyUI cannot detect a tiny file);
* key files: Load Privacy Keys' ``open_key_file`` on the file in the keys folder.

Server path: the rows marked ``server`` as real graphs over HTTP (Load Image → Face Align → Preview Image; Load
Checkpoint → MSI Invert → Save Latent; the shipped recover workflow), each followed by a check that the server still
answers. The pack's classes are the ones ComfyUI imported, so errors are compared by class name.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import input_matrix as im

from .conftest import ComfyGraphError
from .helpers import load_api, set_inputs, tiny

pytestmark = pytest.mark.comfyui
FACE_ALIGN = "DiffPrivacy_FaceAlign"
NODE = "MSI Invert"


def pack_module(comfy, node_type: str, relative: str | None = None):
    """The pack's module (as ComfyUI imported it) defining ``node_type``, or a module next to it."""
    module = sys.modules[comfy.node_classes[node_type].__module__]
    if relative is None:
        return module
    package = module.__name__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{relative}"]


def outcome_of(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def load_image_uses_pyav() -> bool:
    """ComfyUI ≥ 0.33's Load Image decodes files with PyAV (ffmpeg) before Pillow: rounding of the colour
    conversion differs by up to 1/255, EXIF mirror flags are not applied, 16-bit gray is scaled correctly."""
    root = os.environ.get("DP_COMFYUI_DIR") or Path(__file__).resolve().parents[2] / ".cache" / "ComfyUI"
    source = Path(root) / "nodes.py"
    text = source.read_text(encoding="utf-8")
    load_image = text[text.index("class LoadImage"):][:4000]
    return "VideoFromFile" in load_image


#: EXIF orientations with a mirror (2, 4, 5, 7), which PyAV's decoder does not apply
MIRRORED_ORIENTATIONS = {f"exif-orientation-{tag}" for tag in (2, 4, 5, 7)}


def assert_outcome(row: im.Row, path: str, got: tuple[str | None, str]) -> None:
    expected = row.outcome(path, load_image_uses_pyav())
    error, message = got
    assert im.matches(expected, error, message), \
        f"{row.id} via {path}: expected {expected.label()} with {expected.words}, got {error}: {message[:600]}"


def unique(name: str) -> str:
    return f"matrix_{uuid.uuid4().hex[:8]}_{name}"


# --------------------------------------------------------------------------------------------- photos
def load_image(comfy, path) -> torch.Tensor:
    """ComfyUI's Load Image on a copy of ``path`` in its input folder → IMAGE [B,H,W,3]."""
    name = unique(path.name)
    shutil.copyfile(path, comfy.input_dir / name)
    image, _mask = comfy.node_classes["LoadImage"]().load_image(name)
    return image


@pytest.mark.parametrize("row", im.rows("photo", "nodes"), ids=lambda row: row.id)
def test_photo_rows_through_the_nodes(comfy_inprocess, tmp_path, row):
    comfy = comfy_inprocess
    faces_node = pack_module(comfy, FACE_ALIGN)
    path = row.make(tmp_path)
    try:
        image = load_image(comfy, path)
        photo = faces_node.rgb(image[:1], faces_node.FACE_ALIGN_IMAGE)
        faces_node.check_size(photo, faces_node.FACE_ALIGN_IMAGE)
    except Exception as exc:  # noqa: BLE001
        assert_outcome(row, "nodes", outcome_of(exc))
        return
    pyav = load_image_uses_pyav()
    reference = row.reference if pyav and row.nodes_pyav is not None else (row.nodes_reference or row.reference)
    if reference is not None:
        decoded = (photo[0].numpy() * 255.0).round().astype(np.uint8)
        expected = reference()
        assert decoded.shape == expected.shape, (row.id, decoded.shape, expected.shape)
        error = np.abs(decoded.astype(np.int16) - expected.astype(np.int16))
        if pyav and row.id in MIRRORED_ORIENTATIONS:  # ComfyUI's decoder leaves the mirror: the face is mirrored
            error = np.abs(decoded[:, ::-1].astype(np.int16) - expected.astype(np.int16))
            error = np.minimum(error, np.abs(decoded[::-1].astype(np.int16) - expected.astype(np.int16)))
        exact = 1 if pyav else 0  # PyAV's colour conversion rounds differently by one level
        assert (error.max() <= exact) if row.tolerance == 0 else (error.mean() <= row.tolerance + exact), \
            f"{row.id}: Load Image's pixels differ from the expected ones (max {error.max()}, mean {error.mean():.2f})"
    got = (None, "")
    if row.detect:
        try:
            aligned, alignment, _mask, _preview = comfy.node_classes[FACE_ALIGN].execute(image, 64, 0.9).args
            assert aligned.shape == (len(alignment.faces), 64, 64, 3) and len(alignment.faces) >= 1
        except Exception as exc:  # noqa: BLE001
            got = outcome_of(exc)
    assert_outcome(row, "nodes", got)


# ----------------------------------------------------------------------------------------- checkpoints
def _meta_model(family: str):
    """A MODEL ComfyUI builds for ``family`` on the meta device, from its own model configuration classes."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    unet = {"use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32, "legacy": False,
            "use_spatial_transformer": True, "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
            "transformer_depth_output": [0, 0], "transformer_depth_middle": -2, "in_channels": 4, "out_channels": 4,
            "num_head_channels": 64}
    configs = {
        "sdxl": (sm.SDXL, {**unet, "model_channels": 320, "use_linear_in_transformer": True, "context_dim": 2048,
                           "adm_in_channels": 2816, "num_classes": "sequential",
                           "transformer_depth": [0, 0, 2, 2, 10, 10]}),
        "sdxl-refiner": (sm.SDXLRefiner, {**unet, "model_channels": 384, "use_linear_in_transformer": True,
                                          "context_dim": 1280, "adm_in_channels": 2560, "num_classes": "sequential",
                                          "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0]}),
        "sd3": (sm.SD3, {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 1, "input_size": None,
                         "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
                         "context_embedder_config": {"target": "torch.nn.Linear",
                                                     "params": {"in_features": 4096, "out_features": 64}},
                         "num_patches": 36864, "pos_embed_max_size": 192}),
        "flux": (sm.Flux, {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
                           "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0,
                           "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 24, 24],
                           "theta": 10000, "qkv_bias": True, "guidance_embed": True}),
    }
    if family == "flux":  # ComfyUI 0.33's FluxParams adds a required field
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
            configs["flux"][1]["txt_ids_dims"] = []
    cls, config = configs[family]
    model = cls(config).get_model({}, "", device=torch.device("meta"))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def load_checkpoint(comfy, path):
    """ComfyUI's Load Checkpoint on a copy of ``path`` in the checkpoints folder → (MODEL, CLIP, VAE)."""
    name = unique(path.name)
    target = comfy.models.checkpoints / name
    shutil.copyfile(path, target)
    try:
        return comfy.node_classes["CheckpointLoaderSimple"]().load_checkpoint(name)[:3]
    finally:
        target.unlink()


def msi_invert_checks(comfy, model, clip, vae) -> None:
    """What MSI Invert checks before any work, in its order, with the bridge ComfyUI imported."""
    bridge = pack_module(comfy, "DiffPrivacy_MSIInvert", "comfy.models")
    bridge.check_model(model, NODE)
    bridge.check_vae(vae, NODE)
    bridge.check_clip(clip, NODE)


def models_for(comfy, row: im.Row, tmp_path):
    if row.nodes_input.startswith("a MODEL that ComfyUI itself builds"):
        return _meta_model(row.id), "clip", "vae"
    model, clip, vae = load_checkpoint(comfy, row.make(tmp_path))
    if row.id == "sd15-model-sampling-v":
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

        model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    return model, clip, vae


@pytest.mark.parametrize("row", im.rows("checkpoint", "nodes"), ids=lambda row: row.id)
def test_checkpoint_rows_through_the_nodes(comfy_inprocess, tmp_path, row):
    try:
        model, clip, vae = models_for(comfy_inprocess, row, tmp_path)
        if row.nodes_input.startswith("a MODEL that ComfyUI itself builds"):
            pack_module(comfy_inprocess, "DiffPrivacy_MSIInvert", "comfy.models").check_model(model, NODE)
        else:
            msi_invert_checks(comfy_inprocess, model, clip, vae)
        got = (None, "")
    except Exception as exc:  # noqa: BLE001
        got = outcome_of(exc)
    assert_outcome(row, "nodes", got)
    if got[0] == "UnsupportedModelError":
        assert got[1].startswith(f"{NODE}: the MODEL at its 'model' input is ")
    if row.id == "code-in-ckpt":
        assert not (tmp_path / "PAYLOAD-RAN").exists()


def test_every_model_node_checks_the_family_first(comfy_inprocess, tmp_path):
    """MSI Invert, Privacy Sampler, Recover Original and Identity Energy Guidance refuse an inpainting MODEL before
    any work, naming themselves; none reaches a UNet call (the issue's raw shape error)."""
    row = next(r for r in im.ROWS if r.id == "sd15-inpainting")
    model, clip, vae = load_checkpoint(comfy_inprocess, row.make(tmp_path))
    nodes = comfy_inprocess.node_classes
    image = torch.zeros(1, 64, 64, 3)
    calls = {
        "MSI Invert": lambda: nodes["DiffPrivacy_MSIInvert"].execute(model, clip, vae, image, "lite", 1, 1e-3, 2, 1,
                                                                     0, False),
        "Privacy Sampler": lambda: nodes["DiffPrivacy_PrivacySampler"].execute(model, vae, [], None, 2, 0.5, 1, 0,
                                                                               300, image=image),
        "Recover Original": lambda: nodes["DiffPrivacy_Recover"].execute(model, vae, None, None),
        "Identity Energy Guidance": lambda: nodes["DiffPrivacy_IdentityEnergyGuidance"].execute(
            None, image, "anonymize", "official", 1.0, 1.0, "official", "x0", 0.0, 0.5, model=model, vae=vae,
            conditioning=[]),
    }
    for name, call in calls.items():
        with pytest.raises(Exception) as info:
            call()
        assert type(info.value).__name__ == "UnsupportedModelError", (name, info.value)
        assert str(info.value).startswith(f"{name}: the MODEL at its 'model' input is a Stable Diffusion 1.x "
                                          f"inpainting model")


def test_the_family_is_cached_on_the_loaded_model(comfy_inprocess, tmp_path):
    row = next(r for r in im.ROWS if r.id == "sd15-safetensors")
    model, _clip, _vae = load_checkpoint(comfy_inprocess, row.make(tmp_path))
    bridge = pack_module(comfy_inprocess, "DiffPrivacy_MSIInvert", "comfy.models")
    assert bridge.model_family(model).key == "sd1"
    assert model.model.__dict__[bridge.FAMILY_CACHE_ATTRIBUTE] == ("sd1", "ComfyUI loaded it as SD15")
    clone = model.clone()  # a clone shares the BaseModel and its cached family
    assert bridge.model_family(clone).key == "sd1"


# ------------------------------------------------------------------------------------------- key files
@pytest.mark.parametrize("row", im.rows("keyfile", "nodes"), ids=lambda row: row.id)
def test_key_file_rows_through_the_nodes(comfy_inprocess, row):
    keys_node = pack_module(comfy_inprocess, "DiffPrivacy_LoadKeys")
    folder = comfy_inprocess.models.keys
    path = row.make(folder)
    name = unique(path.name)
    path.rename(folder / name)
    try:
        keys = keys_node.open_key_file(name, row.extra.get("passphrase", im.KEY_PASSPHRASE), False)
        got = (None, "")
        assert len(keys.faces) == 1 and keys.faces[0].z_T.shape == (1, 4, 8, 8)
    except Exception as exc:  # noqa: BLE001
        got = outcome_of(exc)
    assert_outcome(row, "nodes", got)
    if got[0] is not None:
        assert got[1].startswith("Load Privacy Keys: "), got[1]


# ------------------------------------------------------------------------------------------- server
#: what :func:`server_outcome` reports for a prompt refused at validation (400): ComfyUI sends the node's message
#: but not the exception's class
REFUSED_AT_VALIDATION = "refused at validation"


def server_outcome(server, graph: dict) -> tuple[str | None, str]:
    """(error class name or None, ComfyUI's text) of one graph through POST /prompt and /history."""
    try:
        server.run(graph, timeout=300)
        return None, ""
    except ComfyGraphError as exc:
        text = str(exc)
        if text.startswith("prompt rejected"):
            return REFUSED_AT_VALIDATION, str((exc.details or {}).get("node_errors", text))
        failed = re.search(r" failed: ([^\s:]+): ", text)  # "node 2 (Type) failed: <exception type>: <message>"
        assert failed, text
        return failed.group(1).rsplit(".", 1)[-1], text


def _alive(server) -> None:
    assert server.process.poll() is None, server.log_tail()
    assert server.get("/system_stats").status_code == 200


@pytest.mark.parametrize("row", [r for r in im.rows(server=True) if "nodes" in r.paths], ids=lambda row: row.id)
def test_server_rows(comfy_server, tmp_path, row):
    server = comfy_server
    path = row.make(tmp_path)
    if row.kind == "photo":
        name = server.upload_image(path, name=unique(path.name))["name"]
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                 "2": {"class_type": FACE_ALIGN, "inputs": {"image": ["1", 0], "size": 64, "min_confidence": 0.9}},
                 "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    elif row.kind == "checkpoint":
        name = unique(path.name)
        shutil.copyfile(path, server.models.checkpoints / name)
        photo = server.upload_image(tmp_path / _astronaut(tmp_path), name=unique("astronaut.png"))["name"]
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
                 "2": {"class_type": "LoadImage", "inputs": {"image": photo}},
                 "3": {"class_type": "DiffPrivacy_MSIInvert", "inputs": {
                     "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "mode": "lite",
                     "steps": 1, "learning_rate": 1e-3, "inversion_steps": 2, "timesteps_per_step": 1,
                     "seed": int(uuid.uuid4().int % 1000), "official_uint8_quirk": False}},
                 "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 1], "filename_prefix": "matrix"}}}
    else:
        name = unique(path.name)
        path.rename(server.models.keys / name)
        graph = tiny(load_api("recover"), photo="unused.png", ckpt=server.models.checkpoint_name, prefix="matrix")
        set_inputs(graph, "DiffPrivacy_LoadKeys", key_file=name, passphrase=im.KEY_PASSPHRASE)
    got = server_outcome(server, graph)
    if got[0] == REFUSED_AT_VALIDATION:  # Load Privacy Keys checks the file before the prompt runs (the same checks)
        expected = row.outcome("server", load_image_uses_pyav())
        assert expected.error is not None and all(word in got[1] for word in expected.words), (row.id, got)
    else:
        assert_outcome(row, "server", got)
    _alive(server)


def _astronaut(folder):
    from .helpers import astronaut_png

    return astronaut_png(folder)


def test_the_server_still_works_after_the_matrix(comfy_server, tmp_path):
    """After every refused input above, a good photo still goes through Face Align on the same server."""
    row = next(r for r in im.ROWS if r.id == "exif-orientation-6")
    path = row.make(tmp_path)
    name = comfy_server.upload_image(path, name=unique(path.name))["name"]
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": FACE_ALIGN, "inputs": {"image": ["1", 0], "size": 64, "min_confidence": 0.9}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    entry = comfy_server.run(graph, timeout=300)
    assert entry["outputs"]["3"]["images"]
    _alive(comfy_server)
