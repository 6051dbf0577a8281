"""Fail closed end to end, through the real server (POST /prompt, /interrupt, /history, the websocket).

A run that fails the identity gate, a run cancelled while MSI Invert trains and a run whose Face Recognizer
Loader names a missing file each leave the key folder and the output folder exactly as they were: the keys
wait for Privacy Sampler's receipt, the images for its outputs. A verifier that still matches fails the run
even when the guiding recognizer passes, and a passing run's report carries every field, computed.

The key folder is looked up in the server's own ``folder_paths`` under the name ``diff_privacy_keys``
(``GET /experiment/models``), never by path: where it lives is the key nodes' business.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time

import pytest
import requests

from .conftest import ComfyGraphError
from .helpers import astronaut_png, load_api, node_ids, saved_images, set_inputs, tiny

pytestmark = pytest.mark.comfyui

KEYS_FOLDER = "diff_privacy_keys"
BATCH = 2


@pytest.fixture(scope="module")
def photo(comfy_server, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gate-photo")
    return comfy_server.upload_image(folder / astronaut_png(folder), name="astronaut_gate.png")["name"]


def _graph(server, photo: str, prefix: str, seed: int) -> dict:
    """The shipped anonymize graph at CPU size, with its own sampler seed (no cached sampler result)."""
    graph = tiny(load_api("anonymize"), photo=photo, ckpt=server.models.checkpoint_name, sampler_steps=4,
                 batch_size=BATCH, prefix=prefix)
    set_inputs(graph, "DiffPrivacy_PrivacySampler", seed=seed)
    set_inputs(graph, "DiffPrivacy_SaveKeys", filename_prefix=prefix)
    return graph


def _add_verifier(graph: dict, verifier_name: str, bound: float) -> str:
    (sampler,) = node_ids(graph, "DiffPrivacy_PrivacySampler")
    graph["800"] = {"class_type": "DiffPrivacy_FaceVerifierLoader",
                    "inputs": {"verifier_name": verifier_name, "bound": bound}}
    graph[sampler]["inputs"]["verifiers"] = ["800", 0]
    return "800"


def key_folders(server) -> list[str]:
    """The server's folders registered under ``diff_privacy_keys``."""
    entries = {entry["name"]: entry["folders"] for entry in server.get_json("/experiment/models")}
    assert KEYS_FOLDER in entries, f"no folder_paths entry {KEYS_FOLDER!r}: {sorted(entries)}"
    return list(entries[KEYS_FOLDER])


def written(server) -> set[str]:
    """Every file in the server's output folder and key folders, with size and time (a rewrite shows too)."""
    found = set()
    for root in [str(server.output_dir), *key_folders(server)]:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                stat = os.stat(path)
                found.add(f"{path} {stat.st_size} {stat.st_mtime_ns}")
    return found


def failure_of(error: ComfyGraphError, event: str = "execution_error") -> dict:
    """The executor's ``event`` message of a failed prompt's history entry."""
    messages = (error.details.get("status") or {}).get("messages", [])
    return next(data for kind, data in messages if kind == event)


class Messages:
    """The server's websocket messages for the test client (``ComfyServer.client_id``), collected in a thread."""

    def __init__(self, server):
        self.url = server.base_url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self.events: list[dict] = []
        self._connected, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self):
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._connected.set()
            while not self._stop.is_set():
                try:
                    message = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(message.data))
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def __enter__(self) -> "Messages":
        self._thread.start()
        assert self._connected.wait(30), "the websocket did not connect"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def wait_for(self, predicate, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no such websocket message in {timeout:.0f} s; last: {self.events[-5:]}")


# ------------------------------------------------------------------------------------ nothing written
def test_a_failed_gate_writes_nothing(comfy_server, photo):
    graph = _graph(comfy_server, photo, "fc_gate", seed=31)
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=-1.0)  # every cosine > −1
    before = written(comfy_server)
    with pytest.raises(ComfyGraphError) as info:
        comfy_server.run(graph, timeout=600)
    failure = failure_of(info.value)
    assert failure["node_type"] == "DiffPrivacy_PrivacySampler"
    assert failure["exception_type"].endswith("ProtectionFailedError")
    assert "nothing was output" in failure["exception_message"]
    assert written(comfy_server) == before


def test_a_run_cancelled_during_msi_writes_nothing(comfy_server, photo):
    graph = _graph(comfy_server, photo, "fc_cancel", seed=32)
    set_inputs(graph, "DiffPrivacy_MSIInvert", steps=100000, seed=977)  # far longer than the test waits
    (msi,) = node_ids(graph, "DiffPrivacy_MSIInvert")
    before = written(comfy_server)
    with Messages(comfy_server) as ws:
        prompt_id = comfy_server.queue(graph)
        ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("node") == msi
                    and m["data"].get("prompt_id") == prompt_id, timeout=300)  # MSI is training
        requests.post(comfy_server.base_url + "/interrupt", json={"prompt_id": prompt_id}, timeout=30)
        with pytest.raises(ComfyGraphError) as info:
            comfy_server.wait(prompt_id, timeout=300)
    interrupted = failure_of(info.value, "execution_interrupted")
    assert interrupted["node_type"] == "DiffPrivacy_MSIInvert"
    assert written(comfy_server) == before


def test_a_missing_recognizer_file_writes_nothing(comfy_server, photo):
    """Before the receipt, ComfyUI ran Save Privacy Keys (its inputs validated) although the loader could not;
    now every output waits for Privacy Sampler, so the prompt is refused as a whole."""
    graph = _graph(comfy_server, photo, "fc_missing", seed=33)
    set_inputs(graph, "DiffPrivacy_FaceRecognizerLoader", recognizer_name="model_ir_se50.pth")
    (loader,) = node_ids(graph, "DiffPrivacy_FaceRecognizerLoader")
    before = written(comfy_server)
    with pytest.raises(ComfyGraphError) as info:
        comfy_server.queue(graph)
    assert info.value.details["error"]["type"] == "prompt_outputs_failed_validation"
    assert loader in info.value.details["node_errors"]
    assert "model_ir_se50.pth" in json.dumps(info.value.details["node_errors"][loader])
    time.sleep(1.0)
    assert written(comfy_server) == before


# -------------------------------------------------------------------------------------------- verifiers
def test_a_verifier_that_still_matches_fails_closed(comfy_server, photo, sface_files):
    """The guiding recognizer passes (no guidance, bound 1) but SFace still says "same person": the run fails,
    naming SFace and only SFace. With random weights the results' SFace cosine is near 0, below OpenCV's
    0.363, so SFace's bound is set to −1, below every finite cosine: SFace then still matches every result."""
    graph = _graph(comfy_server, photo, "fc_sface", seed=34)
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", step_scale=0.0, max_identity_similarity=1.0)
    _add_verifier(graph, "sface", -1.0)
    before = written(comfy_server)
    with pytest.raises(ComfyGraphError) as info:
        comfy_server.run(graph, timeout=600)
    failure = failure_of(info.value)
    message = failure["exception_message"]
    assert failure["node_type"] == "DiffPrivacy_PrivacySampler"
    assert failure["exception_type"].endswith("ProtectionFailedError")
    assert f"{BATCH} of {2 * BATCH} identity checks did not pass" in message
    failing = [line for line in message.splitlines() if line.strip().startswith("- ")]
    assert len(failing) == BATCH and all(line.strip().startswith("- sface, face 0, sample") for line in failing)
    assert "bound -1.000" in message
    assert written(comfy_server) == before


def test_a_passing_run_reports_every_field(comfy_server, photo, sface_files):
    graph = _graph(comfy_server, photo, "fc_report", seed=35)
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=1.0)
    _add_verifier(graph, "sface", 1.0)
    (sampler,) = node_ids(graph, "DiffPrivacy_PrivacySampler")
    graph["810"] = {"class_type": "PreviewAny", "inputs": {"source": [sampler, 3]}}  # the report summary
    graph["811"] = {"class_type": "PreviewImage", "inputs": {"images": [sampler, 4]}}  # the preview
    keys_before = {f for f in written(comfy_server) if any(f.startswith(k) for k in key_folders(comfy_server))}
    entry = comfy_server.run(graph, timeout=600)

    records = saved_images(entry, graph)
    assert len(records) == BATCH
    for record in records:
        image = comfy_server.output_dir / record["subfolder"] / record["filename"]
        report = json.loads(image.with_name(image.stem + ".report.json").read_text(encoding="utf-8"))
        assert report["passed"] and report["task"] == "anonymize" and report["preset"] == "custom"
        assert report["model"]["unet"].startswith("w1:") and report["seconds"] > 0
        assert report["settings"]["verifiers"] == [{"name": "sface", "bound": 1.0}]
        (face,) = report["faces"]
        by_recognizer: dict[str, list] = {}
        for score in face["scores"]:
            by_recognizer.setdefault(score["recognizer"], []).append(score)
        assert sorted(by_recognizer) == ["facenet_vggface2", "sface"]
        for name, scores in by_recognizer.items():
            assert [s["sample"] for s in scores] == list(range(BATCH)), name
            for s in scores:
                assert isinstance(s["cosine"], float) and math.isfinite(s["cosine"]) and -1 <= s["cosine"] <= 1
                assert s["bound"] == 1.0 and s["passed"]
        assert len(face["face_detected"]) == BATCH and all(isinstance(d, bool) for d in face["face_detected"])
        assert len(report["outside_faces"]) == BATCH  # Face Align's background mask is connected
        for outside in report["outside_faces"]:
            assert outside["pixels"] > 0 and -1 <= outside["ssim"] <= 1
            assert (outside["psnr_db"] is None) == outside["identical"]
            assert outside["identical"] or outside["psnr_db"] > 0

    (summary,) = entry["outputs"]["810"]["text"]
    assert "PASSED identity gate" in summary and "sface max" in summary and "outside the faces" in summary
    (preview,) = entry["outputs"]["811"]["images"]
    assert preview["type"] == "temp"
    keys_after = {f for f in written(comfy_server) if any(f.startswith(k) for k in key_folders(comfy_server))}
    assert len(keys_after - keys_before) == 1  # the receipt let Save Privacy Keys write this run's keys
