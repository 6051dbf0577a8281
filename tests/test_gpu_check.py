"""The GPU check's pieces that need no GPU: its graph is the shipped workflow's, its documented downloads are the
ones it runs, and DP_COMFYUI_DEVICE switches the harness between --cpu and CUDA."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"


def load(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"dp_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_graph_is_the_shipped_anonymize_workflow_resized():
    gpu_check = load("gpu_check")
    graph = gpu_check.check_graph(size=512, msi_steps=20, inversion_steps=10, sampler_steps=10, batch=4,
                                  ckpt="sd15_random_full.safetensors")
    kinds = {node["class_type"] for node in graph.values()}
    assert {"DiffPrivacy_MSIInvert", "DiffPrivacy_PrivacySampler", "DiffPrivacy_SaveImageClean"} <= kinds
    assert "DiffPrivacy_SaveKeys" not in kinds
    by_kind = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert by_kind["DiffPrivacy_MSIInvert"]["steps"] == 20 and by_kind["DiffPrivacy_MSIInvert"]["mode"] == "lite"
    assert by_kind["DiffPrivacy_PrivacySampler"]["steps"] == 10 and by_kind["DiffPrivacy_FaceAlign"]["size"] == 512
    for node in graph.values():  # every link points at a node that is still there
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                assert value[0] in graph, f"dangling link to node {value[0]}"


def test_documented_downloads_are_the_ones_prepare_runs():
    text = (SCRIPTS / "gpu_check.sh").read_text(encoding="utf-8")
    header = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#"))
    documented = set(re.findall(r"\b([A-Za-z][\w.-]*==[\w.]+)", header.split("pip download", 1)[1]))

    def array(name: str) -> set[str]:
        body = re.search(rf"^{name}=\((.*?)\)", text, re.S | re.M).group(1)
        return set(body.split())

    assert documented == array("WHEELS") | array("PURE_WHEELS")
    assert not array("WHEELS") & array("PURE_WHEELS")


def test_comfyui_device_switch(monkeypatch):
    comfyui_env = load("comfyui_env")
    monkeypatch.delenv("DP_COMFYUI_DEVICE", raising=False)
    monkeypatch.delenv("DP_FRONTEND_ROOT", raising=False)
    assert comfyui_env.comfyui_device() == "cpu"
    assert "--cpu" in comfyui_env.server_command("/c", 8188)
    monkeypatch.setenv("DP_COMFYUI_DEVICE", "cuda")
    command = comfyui_env.server_command("/c", 8188, extra_args=["--disable-dynamic-vram"])
    assert "--cpu" not in command and command[-1] == "--disable-dynamic-vram"
    monkeypatch.setenv("DP_COMFYUI_DEVICE", "tpu")
    with pytest.raises(ValueError, match="DP_COMFYUI_DEVICE"):
        comfyui_env.comfyui_device()
