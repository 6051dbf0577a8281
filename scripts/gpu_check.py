#!/usr/bin/env python3
"""The GPU check's driver; run it through scripts/gpu_check.sh, whose header says what it checks and how.

    python scripts/gpu_check.py run --comfyui DIR --work DIR [--device cuda|cpu] [--out DIR] [--budget S]
    python scripts/gpu_check.py models --comfyui DIR --out DIR [--layout full|tiny]

``run`` does (a) tests/nodes/test_bridge.py with ComfyUI in-process on the device, then (b) the shipped
anonymize workflow cut down to MSI Invert → Privacy Sampler, served by ComfyUI's own main.py twice: with
dynamic VRAM (ComfyUI 0.33's default on NVIDIA) and with ``--disable-dynamic-vram``. A probe custom node in
the server reports the process's peak torch allocation (torch.cuda.max_memory_allocated), the device's peak
used memory (sampled every 20 ms) and whether dynamic VRAM was on. Everything is printed and, with --out, also
written to gpu_check.txt (and gpu_check.json). The exit status is 0 only when every required part passed.

``models`` writes the random-weight checkpoint and FaceNet file the graph loads. ``full`` is the real SD1.5
layout (UNet 2 res blocks × [1, 2, 4, 4] with transformers, middle block, KL VAE, CLIP-L: 1.07 G parameters,
2.1 GB in fp16) with values drawn as scripts/make_tiny_sd15.py draws them; ``tiny`` is make_tiny_sd15's default.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))

import comfyui_env  # noqa: E402  (scripts/ is not a package)

FACENET_FILE_NAME = "20180402-114759-vggface2.pt"
PHOTO_NAME = "astronaut.png"
PROBE_NAME = "dp_gpu_check_probe"
# (a): the bridge tests this check is for; the rest of test_bridge.py runs too on a GPU, reported as extra
BRIDGE_REQUIRED = re.compile(r"gradient|checkpointing|interrupt|cuda_graphs")
GIB = 1024 ** 3

# The real SD1.5 UNet in ComfyUI's UNetModel terms (its own SD15 config): 2 res blocks per level, channel
# multipliers 1, 2, 4, 4, one transformer block in each res block of the first three levels, middle block.
SD15_UNET = dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1)

# Custom node loaded next to the pack in (b): memory numbers from inside the server process.
PROBE_SOURCE = '''
"""Diff-Privacy GPU check probe: GET /dp_gpu_check/stats, POST /dp_gpu_check/reset (no nodes)."""
import resource
import threading
import time

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}
_state = {"device_peak": 0}


def _device_used():
    free, total = torch.cuda.mem_get_info()
    return total - free


def _sample():
    while True:
        try:
            _state["device_peak"] = max(_state["device_peak"], _device_used())
        except Exception:
            pass
        time.sleep(0.02)


if torch.cuda.is_available():
    threading.Thread(target=_sample, name="dp-gpu-check-sampler", daemon=True).start()


def _stats():
    import comfy.memory_management as memory_management
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher

    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "device": str(mm.get_torch_device()),
           "vram_state": getattr(getattr(mm, "vram_state", None), "name", None),
           "aimdo_enabled": getattr(memory_management, "aimdo_enabled", None),
           "core_model_patcher": getattr(getattr(model_patcher, "CoreModelPatcher", None), "__name__", None),
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), max_allocated=torch.cuda.max_memory_allocated(),
                   max_reserved=torch.cuda.max_memory_reserved(), device_used=_device_used(),
                   device_peak=_state["device_peak"], device_total=torch.cuda.mem_get_info()[1])
    return out


@PromptServer.instance.routes.get("/dp_gpu_check/stats")
async def stats(request):
    return web.json_response(_stats())


@PromptServer.instance.routes.post("/dp_gpu_check/reset")
async def reset(request):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _state["device_peak"] = _device_used()
    return web.json_response(_stats())
'''


def log(line: str = "") -> None:
    print(line, flush=True)


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


# ------------------------------------------------------------------------------------------- models
def full_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the real SD1.5 UNet, from ComfyUI's UNetModel built on ``meta``."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, **SD15_UNET,
                     context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                     use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
                     use_temporal_resblock=False, use_temporal_attention=False, device=torch.device("meta"),
                     operations=comfy.ops.disable_weight_init)
    return {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()}


def write_full_sd15(comfyui_dir: Path, path: Path, seed: int = 0) -> dict:
    """Random-weight SD1.5 checkpoint in the real layout (fp16), values drawn like make_tiny_sd15's."""
    import torch
    from safetensors.torch import save_file

    import make_tiny_sd15

    start = time.perf_counter()
    make_tiny_sd15._import_comfy(comfyui_dir)
    shapes = {**full_unet_shapes(), **make_tiny_sd15.clip_shapes(comfyui_dir), **make_tiny_sd15.vae_shapes("kl")}
    generator = torch.Generator().manual_seed(seed)
    state = {name: make_tiny_sd15.init_tensor(name, shapes[name], generator).to(torch.float16).contiguous()
             for name in sorted(shapes)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata={"gpu_check": json.dumps({"layout": "sd15-full", "seed": seed})})
    os.replace(partial, path)
    return {"params": sum(t.numel() for t in state.values()), "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}


def cmd_models(opts) -> int:
    """Checkpoint (full or tiny layout), random FaceNet and the astronaut photo into ``opts.out``."""
    import make_tiny_sd15

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    ckpt = out / f"sd15_random_{opts.layout}.safetensors"
    if not ckpt.is_file():
        if opts.layout == "full":
            summary["checkpoint"] = write_full_sd15(Path(opts.comfyui), ckpt)
        else:
            summary["checkpoint"] = make_tiny_sd15.make_checkpoint(opts.comfyui, ckpt)
    facenet = out / FACENET_FILE_NAME
    if not facenet.is_file():
        make_tiny_sd15.make_random_facenet(facenet, seed=0)
    photo = out / PHOTO_NAME
    if not photo.is_file():
        from PIL import Image
        from skimage import data

        Image.fromarray(data.astronaut()).save(photo)
    summary.update(checkpoint_path=str(ckpt), facenet=str(facenet), photo=str(photo))
    print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------- (b) graph
def check_graph(*, size: int, msi_steps: int, inversion_steps: int, sampler_steps: int, batch: int,
                ckpt: str) -> dict:
    """workflows/api/anonymize.json cut to the protection path (no Save Privacy Keys), sized for the check."""
    graph = json.loads((REPO_ROOT / "workflows" / "api" / "anonymize.json").read_text(encoding="utf-8"))
    graph = {k: v for k, v in copy.deepcopy(graph).items() if v["class_type"] != "DiffPrivacy_SaveKeys"}

    def set_inputs(class_type: str, **values):
        ids = [k for k, v in graph.items() if v["class_type"] == class_type]
        assert ids, f"the shipped anonymize workflow has no {class_type} node"
        for node_id in ids:
            for name, value in values.items():
                assert name in graph[node_id]["inputs"], f"{class_type} has no input {name!r}"
                graph[node_id]["inputs"][name] = value

    set_inputs("CheckpointLoaderSimple", ckpt_name=ckpt)
    set_inputs("LoadImage", image=PHOTO_NAME)
    set_inputs("DiffPrivacy_FaceAlign", size=size)
    set_inputs("DiffPrivacy_MSIInvert", mode="lite", steps=msi_steps, inversion_steps=inversion_steps)
    set_inputs("DiffPrivacy_PrivacySampler", steps=sampler_steps, batch_size=batch)
    # random weights: a result may still "match" the source; the fail-closed gate is tested elsewhere
    set_inputs("DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=1.0)
    set_inputs("DiffPrivacy_SaveImageClean", filename_prefix="gpu_check/anonymized")
    return graph


class Server:
    """ComfyUI's main.py with the pack and the probe, on a free loopback port."""

    def __init__(self, comfyui: Path, work: Path, models: dict, extra_args: list[str]):
        self.comfyui, self.work = comfyui, work
        shutil.rmtree(work, ignore_errors=True)  # each leg starts from an empty folder
        for name in ("input", "output", "temp", "user", "checkpoints", "face_recognition", "custom_nodes",
                     "frontend-stub"):
            (work / name).mkdir(parents=True, exist_ok=True)
        links = {work / "checkpoints" / Path(models["checkpoint_path"]).name: models["checkpoint_path"],
                 work / "face_recognition" / FACENET_FILE_NAME: models["facenet"],
                 work / "custom_nodes" / "diff_privacy": REPO_ROOT}
        for link, target in links.items():
            if not link.exists():
                link.symlink_to(Path(target).resolve())
        shutil.copyfile(models["photo"], work / "input" / PHOTO_NAME)  # LoadImage refuses links out of input/
        (work / "custom_nodes" / PROBE_NAME).mkdir(exist_ok=True)
        (work / "custom_nodes" / PROBE_NAME / "__init__.py").write_text(PROBE_SOURCE, encoding="utf-8")
        # an API-only check needs no frontend: a stub root spares carrying the 50 MB frontend package
        (work / "frontend-stub" / "index.html").write_text("<!doctype html><title>gpu check</title>\n")
        yaml = comfyui_env.write_extra_model_paths(work / "extra_model_paths.yaml", {
            "checkpoints": work / "checkpoints", "face_recognition": work / "face_recognition",
            "custom_nodes": work / "custom_nodes"})
        self.port = comfyui_env.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        os.environ.pop("DP_FRONTEND_ROOT", None)
        self.cmd = comfyui_env.server_command(
            comfyui, self.port, extra_model_paths=yaml, output_dir=work / "output", input_dir=work / "input",
            user_dir=work / "user", temp_dir=work / "temp",
            extra_args=["--front-end-root", work / "frontend-stub", "--database-url", "sqlite:///:memory:",
                        *extra_args])
        self.log_path = work / "server.log"
        self.process = None

    def start(self, timeout: float) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        start = time.monotonic()
        with open(self.log_path, "wb") as handle:
            self.process = subprocess.Popen(self.cmd, cwd=self.comfyui, stdout=handle, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during start-up")
            try:
                self.get("/dp_gpu_check/stats")
                return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s")

    def request(self, path: str, payload=None, method: str | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str):
        return self.request(path)

    def run(self, graph: dict, timeout: float) -> dict:
        try:
            prompt_id = self.request("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"prompt rejected ({err.code}): {err.read().decode(errors='replace')[:2000]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died with code {self.process.returncode}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id) or {}
            status = entry.get("status") or {}
            if status.get("completed"):
                return entry
            if status.get("status_str") == "error":
                failure = next((data for event, data in status.get("messages", [])
                                if event in ("execution_error", "execution_interrupted")), {})
                raise RuntimeError(f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
                                   f"{failure.get('exception_type')}: {failure.get('exception_message')}")
            time.sleep(0.2)
        raise TimeoutError(f"graph not finished after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError as err:
            return f"<no log: {err}>"


def run_graph_leg(opts, models: dict, label: str, extra_args: list[str], timeout: float) -> dict:
    """Start a server, run the check graph once, collect the probe's numbers and the images, stop."""
    import numpy as np
    from PIL import Image

    dynamic_wanted = "--disable-dynamic-vram" not in extra_args
    result = {"label": label, "args": extra_args, "passed": False, "notes": []}
    server = None
    total_start = time.monotonic()
    try:
        server = Server(Path(opts.comfyui), Path(opts.work) / f"server-{label}", models, extra_args)
        result["startup_s"] = round(server.start(timeout=min(180.0, timeout)), 1)
        before = server.request("/dp_gpu_check/reset", {})
        graph = check_graph(size=opts.size, msi_steps=opts.msi_steps, inversion_steps=opts.inversion_steps,
                            sampler_steps=opts.sampler_steps, batch=opts.batch,
                            ckpt=Path(models["checkpoint_path"]).name)
        start = time.monotonic()
        entry = server.run(graph, timeout=max(10.0, timeout - (time.monotonic() - total_start)))
        result["graph_s"] = round(time.monotonic() - start, 1)
        after = server.get("/dp_gpu_check/stats")
        result.update(stats_before=before, stats=after)
        images = [img for node in entry.get("outputs", {}).values() for img in node.get("images", [])]
        checked = []
        for record in images:
            path = server.work / "output" / record.get("subfolder", "") / record["filename"]
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            checked.append({"size": list(image.size), "std": round(float(pixels.std()), 2)})
        result["images"] = checked
        problems = []
        if len(checked) != opts.batch:
            problems.append(f"{len(checked)} images written, {opts.batch} expected")
        if any(c["std"] == 0 for c in checked):
            result["notes"].append("an output image is a single colour (random weights can do that)")
        if opts.device == "cuda":
            if after.get("aimdo_enabled") is not dynamic_wanted:
                problems.append(f"dynamic VRAM {'on' if after.get('aimdo_enabled') else 'off'}, wanted "
                                f"{'on' if dynamic_wanted else 'off'} (CoreModelPatcher "
                                f"{after.get('core_model_patcher')})")
            if not str(after.get("device", "")).startswith("cuda"):
                problems.append(f"ComfyUI ran on {after.get('device')}")
        result["problems"] = problems
        result["passed"] = not problems
    except Exception as err:  # the check reports, it does not stop at the first failure
        result["problems"] = [f"{type(err).__name__}: {err}"]
        if server and server.process is not None and server.process.poll() is not None:
            code = server.process.returncode
            result["problems"].append(f"the ComfyUI server exited with code {code}"
                                      + (" (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""))
        result["log_tail"] = server.log_tail() if server else ""
    finally:
        if server:
            server.stop()
        result["total_s"] = round(time.monotonic() - total_start, 1)
    return result


def describe_leg(leg: dict, device: str) -> list[str]:
    stats = leg.get("stats") or {}
    verdict = "PASS" if leg["passed"] else "FAIL"
    head = (f"{verdict} in {leg.get('total_s')} s (start-up {leg.get('startup_s', '-')} s, graph "
            f"{leg.get('graph_s', '-')} s)")
    lines = [head]
    if device == "cuda":
        lines.append(f"peak GPU memory: torch.cuda.max_memory_allocated {gib(stats.get('max_allocated'))}, "
                     f"max_memory_reserved {gib(stats.get('max_reserved'))}, device used (sampled) "
                     f"{gib(stats.get('device_peak'))} of {gib(stats.get('device_total'))}")
    else:
        lines.append("peak GPU memory: n/a (ComfyUI on the CPU)")
    lines.append(f"dynamic VRAM (comfy-aimdo) {'on' if stats.get('aimdo_enabled') else 'off'}, CoreModelPatcher "
                 f"{stats.get('core_model_patcher')}, ComfyUI device {stats.get('device')}, vram_state "
                 f"{stats.get('vram_state')}, server peak RSS {gib(stats.get('max_rss_bytes'))}")
    if leg.get("images"):
        lines.append("images: " + ", ".join(f"{i['size'][0]}x{i['size'][1]} std {i['std']}" for i in leg["images"]))
    lines += [f"problem: {p}" for p in leg.get("problems", [])] + [f"note: {n}" for n in leg.get("notes", [])]
    if leg.get("log_tail"):
        lines.append("server log (tail):\n" + textwrap.indent(leg["log_tail"], "    | "))
    return lines


# ------------------------------------------------------------------------------------------- (a) bridge
def run_bridge_tests(opts, timeout: float) -> dict:
    work = Path(opts.work)
    junit = work / "bridge-junit.xml"
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "tests/nodes/test_bridge.py",
            f"--junitxml={junit}"]
    if opts.device == "cpu":  # the CPU proof runs only the required tests (CI runs the whole file on the CPU)
        args += ["-k", "gradient or checkpointing or interrupt"]
    env = dict(os.environ, DP_COMFYUI_DIR=str(opts.comfyui), DP_COMFYUI_DEVICE=opts.device, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
               DP_TEST_MODEL_CACHE=os.environ.get("DP_TEST_MODEL_CACHE") or str(work / "test-models"))
    junit.unlink(missing_ok=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        code = "timeout"
    result = {"seconds": round(time.monotonic() - start, 1), "exit": code, "tests": {}}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            result["tests"][case.get("name")] = outcome
    required = {name: outcome for name, outcome in result["tests"].items() if BRIDGE_REQUIRED.search(name)}
    result["required"] = required
    result["passed"] = len(required) >= 3 and all(o == "passed" for o in required.values())
    result["output_tail"] = output[-4000:]
    return result


# ------------------------------------------------------------------------------------------- run
def environment_line(device: str, comfyui: str) -> str:
    import torch

    parts = [f"device {device}", f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"ComfyUI {comfyui_env.read_comfyui_version(comfyui)}"]
    if torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name())
    return ", ".join(parts)


def cmd_run(opts) -> int:
    started = time.monotonic()
    deadline = started + opts.budget
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    report: list[str] = []

    def say(line: str = "") -> None:
        log(line)
        report.append(line)

    def left(reserve: float = 0.0) -> float:
        return deadline - time.monotonic() - reserve

    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        say(f"FAIL: --device cuda, but torch {torch.__version__} sees no CUDA device")
        return finish(opts, report, {"passed": False}, started)
    say(f"== Diff-Privacy GPU check: {environment_line(opts.device, opts.comfyui)}")
    say(f"   budget {opts.budget:.0f} s; graph: {opts.size} px, MSI lite {opts.msi_steps} steps, inversion "
        f"{opts.inversion_steps}, sampler {opts.sampler_steps} steps, batch {opts.batch}; checkpoint layout "
        f"{opts.layout}")
    if opts.device == "cpu":
        say("!! NO GPU: DP_GPU_CHECK_DEVICE=cpu. This is the CPU proof of the check's plumbing, at tiny sizes.")
        say("!! SKIPPED (needs CUDA): the bridge tests on CUDA (run on the CPU instead), peak GPU memory, and")
        say("!! dynamic VRAM itself: ComfyUI never enables it with --cpu, so both (b) legs run the same code path.")
    summary = {"device": opts.device, "environment": environment_line(opts.device, opts.comfyui)}

    # models ---------------------------------------------------------------------------------------------
    start = time.monotonic()
    env = dict(os.environ, DP_COMFYUI_DEVICE="cpu")  # weights are drawn on the CPU, whatever the check runs on
    proc = subprocess.run([sys.executable, __file__, "models", "--comfyui", str(opts.comfyui), "--out",
                           str(work / "models"), "--layout", opts.layout], env=env, capture_output=True, text=True,
                          timeout=max(30.0, left(240)))
    if proc.returncode != 0:
        say(f"FAIL: could not write the check's models:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return finish(opts, report, {**summary, "passed": False}, started)
    models = json.loads(proc.stdout.strip().splitlines()[-1])
    say(f"[models] {opts.layout} SD1.5-layout checkpoint, random FaceNet, astronaut photo ready in "
        f"{time.monotonic() - start:.1f} s ({models.get('checkpoint', {}).get('params', 'cached')} parameters)")

    # (a) ------------------------------------------------------------------------------------------------
    bridge = run_bridge_tests(opts, timeout=max(30.0, min(240.0, left(200))))
    summary["bridge"] = {k: v for k, v in bridge.items() if k != "output_tail"}
    required = ", ".join(f"{name} {outcome}" for name, outcome in bridge["required"].items()) or "none ran"
    say(f"[a] bridge tests (tests/nodes/test_bridge.py) with ComfyUI in-process on {opts.device}: "
        f"{'PASS' if bridge['passed'] else 'FAIL'} in {bridge['seconds']} s (pytest exit {bridge['exit']})")
    say(f"    required (gradient / checkpointing / interrupt; CUDA graphs on CUDA): {required}")
    others = {n: o for n, o in bridge["tests"].items() if n not in bridge["required"]}
    if others:
        counts = {o: sum(1 for v in others.values() if v == o) for o in sorted(set(others.values()))}
        say(f"    rest of the file (reported, not required): {counts}")
        for name, outcome in others.items():
            if outcome == "failed":
                say(f"      failed: {name}")
    if not bridge["passed"] or any(o == "failed" for o in others.values()):
        say(textwrap.indent(bridge["output_tail"][-2500:], "    | "))

    # (b) ------------------------------------------------------------------------------------------------
    legs = []
    for label, extra in (("dynamic-vram-on", []), ("dynamic-vram-off", ["--disable-dynamic-vram"])):
        remaining = left(15)
        if remaining < 30:
            say(f"[b] {label}: FAIL, not run: the {opts.budget:.0f} s budget is spent")
            legs.append({"label": label, "passed": False, "problems": ["budget spent"]})
            continue
        leg = run_graph_leg(opts, models, label, extra, timeout=remaining if label.endswith("off") else remaining / 2)
        legs.append(leg)
        title = ("dynamic VRAM on (ComfyUI 0.33's default)" if not extra else "--disable-dynamic-vram")
        if opts.device == "cpu" and not extra:
            title = "no VRAM flag (SKIPPED: dynamic VRAM needs CUDA; with --cpu ComfyUI keeps it off)"
        say(f"[b] MSI Invert + Privacy Sampler graph, {opts.size} px, {title}:")
        for line in describe_leg(leg, opts.device):
            say("    " + line)
    summary["graph"] = legs
    passed = bridge["passed"] and all(leg["passed"] for leg in legs)
    summary["passed"] = passed
    say(f"RESULT: {'PASS' if passed else 'FAIL'} in {time.monotonic() - started:.0f} s"
        + (" (CPU proof: the GPU-only parts above were skipped)" if opts.device == "cpu" else ""))
    return finish(opts, report, summary, started)


def finish(opts, report: list[str], summary: dict, started: float) -> int:
    summary["seconds"] = round(time.monotonic() - started, 1)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "gpu_check.txt", "a", encoding="utf-8") as handle:  # after gpu_check.sh's setup lines
            handle.write("\n".join(report) + "\n")
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return 0 if summary.get("passed") else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models")
    models.add_argument("--comfyui", required=True)
    models.add_argument("--out", required=True)
    models.add_argument("--layout", choices=["full", "tiny"], default="full")
    run = sub.add_parser("run")
    run.add_argument("--comfyui", required=True)
    run.add_argument("--work", required=True)
    run.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    run.add_argument("--out", default=os.environ.get("OUT") or None)
    run.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    run.add_argument("--layout", choices=["full", "tiny"], default=None, help="default: full on cuda, tiny on cpu")
    for name, gpu, cpu in (("size", 512, 64), ("msi-steps", 20, 2), ("inversion-steps", 10, 2),
                           ("sampler-steps", 10, 4), ("batch", 4, 1)):
        run.add_argument(f"--{name}", type=int, default=None, help=f"default {gpu} on cuda, {cpu} on cpu")
    opts = parser.parse_args(argv)
    if opts.command == "models":
        return cmd_models(opts)
    gpu = opts.device == "cuda"
    opts.comfyui = str(Path(opts.comfyui).resolve())
    opts.layout = opts.layout or ("full" if gpu else "tiny")
    for name, gpu_value, cpu_value in (("size", 512, 64), ("msi_steps", 20, 2), ("inversion_steps", 10, 2),
                                       ("sampler_steps", 10, 4), ("batch", 4, 1)):
        if getattr(opts, name) is None:
            setattr(opts, name, gpu_value if gpu else cpu_value)
    os.environ["DP_COMFYUI_DEVICE"] = opts.device  # read by comfyui_env.server_command for the (b) servers
    return cmd_run(opts)


if __name__ == "__main__":
    sys.exit(main())
