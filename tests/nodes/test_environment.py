"""The ComfyUI test environment itself: generated models, the in-process executor and the HTTP server.

Only ComfyUI's core nodes are used here, so these tests hold before the pack defines any node.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT, ComfyGraphError

pytestmark = pytest.mark.comfyui

SIZE = 64


def txt2img_graph(ckpt_name: str, seed: int, steps: int = 2, prefix: str = "dp_env") -> dict:
    """API-format SD1.5 text-to-image graph of core nodes only, SIZE x SIZE, saving a PNG."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def img2img_graph(ckpt_name: str, image_name: str, seed: int) -> dict:
    """LoadImage -> VAEEncode -> KSampler(denoise 0.5) -> VAEDecode -> SaveImage."""
    graph = txt2img_graph(ckpt_name, seed, prefix="dp_env_i2i")
    graph["4"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
    graph["5"]["inputs"]["denoise"] = 0.5
    graph["8"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
    return graph


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_rendered(pixels: np.ndarray) -> None:
    """A decoded 64x64 RGB image that is not constant (NaN conditioning or a dead VAE gives a flat image)."""
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.dtype == np.uint8
    assert pixels.std() > 1.0, "decoded image is flat: the checkpoint did not load or produced NaN"


def saved_image(history: dict, node_id: str = "7") -> dict:
    images = history["outputs"][node_id]["images"]
    assert len(images) == 1
    assert images[0]["type"] == "output"
    return images[0]


# --------------------------------------------------------------------------------------- generated models

def test_tiny_checkpoint_is_reproducible(comfyui_dir, tiny_checkpoint, tmp_path):
    import make_tiny_sd15
    from safetensors import safe_open

    summary = make_tiny_sd15.make_checkpoint(comfyui_dir, tmp_path / "again.safetensors", seed=0)
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "again.safetensors") == digest(tiny_checkpoint)
    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert list(metadata) == ["tiny_sd15"]
    assert json.loads(metadata["tiny_sd15"])["seed"] == 0
    assert "first_stage_model.taesd_decoder.1.weight" in keys
    assert not any(k.startswith("model.diffusion_model.label_emb") for k in keys)
    assert summary["params"]["clip"] > 100_000_000  # the full CLIP-L text encoder is written


def test_random_facenet_has_vggface2_layout(facenet_checkpoint):
    import torch
    from facenet_pytorch import InceptionResnetV1

    state = torch.load(facenet_checkpoint, map_location="cpu", weights_only=True)
    assert state["logits.weight"].shape == (8631, 512)
    assert state["logits.bias"].shape == (8631,)
    embedder = InceptionResnetV1(pretrained=None).eval()
    missing, unexpected = embedder.load_state_dict(state, strict=False)
    assert missing == [] and sorted(unexpected) == ["logits.bias", "logits.weight"]
    with torch.no_grad():
        embedding = embedder(torch.zeros(1, 3, 160, 160))
    assert torch.allclose(embedding.norm(dim=1), torch.ones(1), atol=1e-4)


# --------------------------------------------------------------------------------------- in-process executor

def test_inprocess_loads_checkpoint_as_sd15_with_taesd(comfy_inprocess):
    import torch

    loader = comfy_inprocess.node_classes["CheckpointLoaderSimple"]()
    model, clip, vae = loader.load_checkpoint(comfy_inprocess.models.checkpoint_name)[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a face"))
    assert cond.shape[-1] == 768
    assert torch.isfinite(cond).all()


def test_inprocess_sees_pack_as_custom_node(comfy_inprocess):
    pack = comfy_inprocess.models.pack_dir
    assert pack.resolve() == REPO_ROOT
    # ComfyUI reports every custom-node folder it tried, loaded or not.
    assert any(str(pack) in line for line in comfy_inprocess.startup_log)


def test_inprocess_runs_core_txt2img_graph(comfy_inprocess):
    history = comfy_inprocess.run(txt2img_graph(comfy_inprocess.models.checkpoint_name, seed=11))
    image = saved_image(history)
    path = comfy_inprocess.output_path(image)
    assert path.is_file() and path.parent == comfy_inprocess.output_dir
    assert_rendered(png_pixels(path.read_bytes()))
    assert any(event == "execution_success" for event, _ in history["messages"])


def test_inprocess_sampling_is_seeded(comfy_inprocess):
    ckpt = comfy_inprocess.models.checkpoint_name
    first = png_pixels(comfy_inprocess.output_path(saved_image(
        comfy_inprocess.run(txt2img_graph(ckpt, seed=5)))).read_bytes())
    comfy_inprocess.reset()  # otherwise the identical graph is served from ComfyUI's cache
    again = png_pixels(comfy_inprocess.output_path(saved_image(
        comfy_inprocess.run(txt2img_graph(ckpt, seed=5)))).read_bytes())
    other = png_pixels(comfy_inprocess.output_path(saved_image(
        comfy_inprocess.run(txt2img_graph(ckpt, seed=6)))).read_bytes())
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0


def test_inprocess_validation_error_names_the_bad_input(comfy_inprocess):
    graph = txt2img_graph("no_such_model.safetensors", seed=1)
    with pytest.raises(ComfyGraphError, match="no_such_model.safetensors") as caught:
        comfy_inprocess.run(graph)
    assert "1" in caught.value.details["node_errors"]


def test_inprocess_execution_error_is_raised_with_node(comfy_inprocess, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    comfy_inprocess.folder_paths.add_model_folder_path("checkpoints", str(broken))
    with pytest.raises(ComfyGraphError, match=r"node 1 \(CheckpointLoaderSimple\) failed") as caught:
        comfy_inprocess.run(txt2img_graph("broken.safetensors", seed=2))
    assert caught.value.details["node_id"] == "1"


def test_pyproject_is_read_by_comfyui_config_parser(comfy_inprocess):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO_ROOT))
    assert config.project.name == "diff-privacy-nodes"
    assert "comfyui" not in config.project.name.lower()  # the registry rejects ids naming ComfyUI
    assert config.project.license.text == "GPL-3.0-or-later"
    assert config.tool_comfy.publisher_id == "diffprivacy"
    assert config.tool_comfy.display_name


@pytest.mark.slow
def test_inprocess_kl_vae_three_level_checkpoint(comfy_inprocess, make_tiny_checkpoint, tmp_path):
    """The generator's larger layout: 3 UNet levels + middle block, KL autoencoder, CLIP stored as fp8."""
    path = make_tiny_checkpoint(vae="kl", levels=3, mid_block=True, clip_dtype="fp8")
    folder = tmp_path / "kl"
    folder.mkdir()
    (folder / "tiny_sd15_kl.safetensors").symlink_to(path)
    comfy_inprocess.folder_paths.add_model_folder_path("checkpoints", str(folder))

    loader = comfy_inprocess.node_classes["CheckpointLoaderSimple"]()
    model, _, vae = loader.load_checkpoint("tiny_sd15_kl.safetensors")[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "AutoencoderKL"
    assert len(model.model.diffusion_model.middle_block) == 3  # res + attention + res
    history = comfy_inprocess.run(txt2img_graph("tiny_sd15_kl.safetensors", seed=4, prefix="dp_env_kl"))
    assert_rendered(png_pixels(comfy_inprocess.output_path(saved_image(history)).read_bytes()))


# --------------------------------------------------------------------------------------- HTTP server

@pytest.mark.server
def test_server_runs_core_txt2img_graph(comfy_server, comfy_inprocess):
    seed = 21
    entry = comfy_server.run(txt2img_graph(comfy_server.models.checkpoint_name, seed=seed))
    image = saved_image(entry)
    pixels = png_pixels(comfy_server.view(image["filename"], image["subfolder"], image["type"]))
    assert_rendered(pixels)
    # Same seed, same code path in this process: the same picture up to CPU float reduction order.
    local = png_pixels(comfy_inprocess.output_path(saved_image(
        comfy_inprocess.run(txt2img_graph(comfy_inprocess.models.checkpoint_name, seed=seed)))).read_bytes())
    assert np.abs(local.astype(int) - pixels.astype(int)).max() <= 2


@pytest.mark.server
def test_server_upload_and_img2img(comfy_server):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    source = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    uploaded = comfy_server.upload_image(source, name="dp_env_gradient.png")
    assert uploaded["name"] == "dp_env_gradient.png"
    assert np.array_equal(png_pixels(comfy_server.view(uploaded["name"], type="input")), source)

    entry = comfy_server.run(img2img_graph(comfy_server.models.checkpoint_name, uploaded["name"], seed=3))
    image = saved_image(entry)
    assert_rendered(png_pixels(comfy_server.view(image["filename"], image["subfolder"], image["type"])))


@pytest.mark.server
def test_server_rejects_invalid_graph_with_node_errors(comfy_server):
    with pytest.raises(ComfyGraphError, match="no_such_model.safetensors") as caught:
        comfy_server.queue(txt2img_graph("no_such_model.safetensors", seed=1))
    assert "1" in caught.value.details.get("node_errors", {})
