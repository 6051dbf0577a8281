#!/usr/bin/env python3
"""Start ComfyUI with this pack and run workflows/anonymize.json headless on one photo.

    python scripts/run_demo.py [--checkpoint SD15.safetensors] [--facenet 20180402-114759-vggface2.pt]
                               [--arcface model_ir_se50.pth] [--photo PHOTO] [--comfyui DIR] [--out DIR]

(``bash scripts/demo.sh`` prepares the environment first, then runs this.) Without real weights it falls back
to generated random weights — and says so loudly: the pipeline then runs for real, but the pictures are noise.
Outputs (anonymized photos) land in --out (default ./demo-output); the encrypted keys in
<out>/diff_privacy_keys/ (the models folder diff_privacy_keys, mapped there by the demo's extra_model_paths.yaml).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfyui_env  # noqa: E402
import make_tiny_sd15  # noqa: E402

BANNER_LINES = (
    "NO REAL {what} GIVEN: using GENERATED RANDOM WEIGHTS instead.",
    "The whole pipeline runs for real, but the output pictures are noise, not protected faces.",
    "Pass --checkpoint (an SD1.5 .safetensors) and --facenet (20180402-114759-vggface2.pt) for real results.",
)


def loud(what: str) -> None:
    lines = [line.replace("{what}", what.upper()) for line in BANNER_LINES]
    width = max(map(len, lines)) + 4
    bar = "#" * (width + 2)
    body = "\n".join(f"# {line.ljust(width - 2)} #" for line in lines)
    print(f"\n{bar}\n{body}\n{bar}\n", file=sys.stderr, flush=True)


def http_json(url: str, payload: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def upload_image(base: str, path: Path) -> str:
    boundary = "----diffprivacy" + secrets.token_hex(8)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(base + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["name"]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("ComfyUI exited during startup; see its log above")
        try:
            http_json(base + "/system_stats", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s")


def default_photo(dest: Path) -> Path:
    from PIL import Image
    from skimage import data
    Image.fromarray(data.astronaut()).save(dest)
    return dest


def link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        dest.symlink_to(src.resolve())
    except OSError:
        shutil.copy2(src, dest)


def prepare_models(args, work: Path) -> tuple[str, str, bool]:
    """models/checkpoints + models/face_recognition; returns (ckpt name, recognizer name, real weights?)."""
    ckpt_dir, fr_dir = work / "models" / "checkpoints", work / "models" / "face_recognition"
    real = True
    if args.checkpoint:
        link_or_copy(Path(args.checkpoint), ckpt_dir / Path(args.checkpoint).name)
        ckpt = Path(args.checkpoint).name
    else:
        loud("checkpoint")
        real = False
        ckpt = "tiny_sd15_random.safetensors"
        if not (ckpt_dir / ckpt).exists():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            make_tiny_sd15.make_checkpoint(args.comfyui, ckpt_dir / ckpt)
    recognizer = None
    for path in (args.arcface, args.facenet):
        if path:
            link_or_copy(Path(path), fr_dir / Path(path).name)
            recognizer = recognizer or Path(path).name
    if recognizer is None:
        loud("facenet")
        real = False
        recognizer = "20180402-114759-vggface2.pt"
        if not (fr_dir / recognizer).exists():
            make_tiny_sd15.make_random_facenet(fr_dir / recognizer)
    return ckpt, recognizer, real


def configure(prompt: dict, *, ckpt: str, recognizer: str, photo: str, real: bool) -> dict:
    """Point the API-format anonymize workflow at our files; shrink it when the weights are random."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        elif kind == "LoadImage":
            inputs["image"] = photo
        elif kind == "DiffPrivacy_FaceRecognizerLoader":
            inputs["recognizer_name"] = recognizer
        elif not real and kind == "DiffPrivacy_FaceAlign":
            inputs["size"] = 64
        elif not real and kind == "DiffPrivacy_MSIInvert":
            inputs["steps"], inputs["inversion_steps"] = 20, 10
        elif not real and kind == "DiffPrivacy_PrivacySampler":
            inputs["steps"], inputs["batch_size"] = 10, 2
        elif not real and kind == "DiffPrivacy_IdentityEnergyGuidance":
            inputs["max_identity_similarity"] = 1.0  # random recognizers match everything; see README
    return prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an SD1.x single-file checkpoint (.safetensors)")
    ap.add_argument("--facenet", help="20180402-114759-vggface2.pt")
    ap.add_argument("--arcface", help="model_ir_se50.pth (used instead of FaceNet when given)")
    ap.add_argument("--photo", help="a photo with one face (default: scikit-image's astronaut)")
    ap.add_argument("--comfyui", help="an existing ComfyUI folder (default: the pinned 0.3.75 copy)")
    ap.add_argument("--out", default="demo-output", help="where the results go")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the workflow")
    args = ap.parse_args(argv)

    args.comfyui = Path(args.comfyui).resolve() if args.comfyui else comfyui_env.prepare_comfyui()
    out = Path(args.out).resolve()
    work = REPO / ".cache" / "demo"
    ckpt, recognizer, real = prepare_models(args, work)
    custom = work / "custom_nodes"
    link_or_copy(REPO, custom / "diff_privacy")
    yaml = comfyui_env.write_extra_model_paths(work / "extra_model_paths.yaml", {
        "checkpoints": work / "models" / "checkpoints", "face_recognition": work / "models" / "face_recognition",
        "custom_nodes": custom, "diff_privacy_keys": out / "diff_privacy_keys"})
    input_dir, output_dir = work / "input", out / "comfyui-output"
    input_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    photo = Path(args.photo) if args.photo else default_photo(work / "astronaut.png")

    env = dict(os.environ)
    if not env.get("DIFF_PRIVACY_PASSPHRASE"):
        env["DIFF_PRIVACY_PASSPHRASE"] = secrets.token_urlsafe(18)
        secret_file = out / "passphrase.txt"
        secret_file.write_text(env["DIFF_PRIVACY_PASSPHRASE"] + "\n")
        secret_file.chmod(0o600)
        print(f"[demo] DIFF_PRIVACY_PASSPHRASE was not set: generated one, stored in {secret_file} (mode 600)")
    port = comfyui_env.free_port()
    cmd = comfyui_env.server_command(args.comfyui, port, extra_model_paths=yaml, output_dir=output_dir,
                                     input_dir=input_dir)
    if any(flag in os.environ.get("DP_DEMO_GPU", "") for flag in ("1", "yes")):
        cmd.remove("--cpu")
    print("[demo] starting ComfyUI:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=args.comfyui, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        name = upload_image(base, photo)
        prompt = json.loads((REPO / "workflows" / "api" / "anonymize.json").read_text())
        prompt = configure(prompt, ckpt=ckpt, recognizer=recognizer, photo=name, real=real)
        answer = http_json(base + "/prompt", {"prompt": prompt, "client_id": "diff-privacy-demo"})
        if answer.get("node_errors"):
            print(json.dumps(answer["node_errors"], indent=2), file=sys.stderr)
            return 1
        prompt_id = answer["prompt_id"]
        end = time.time() + args.timeout
        while True:
            entry = http_json(f"{base}/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed"):
                break
            if entry and entry.get("status", {}).get("status_str") == "error":
                print(json.dumps(entry["status"].get("messages", []), indent=2)[-4000:], file=sys.stderr)
                return 1
            if time.time() > end:
                raise TimeoutError("the workflow did not finish in time")
            time.sleep(2)
        written = []
        for node_out in entry["outputs"].values():
            for image in node_out.get("images", []):
                query = urllib.parse.urlencode(image)
                with urllib.request.urlopen(f"{base}/view?{query}", timeout=60) as resp:
                    target = out / image["filename"]
                    target.write_bytes(resp.read())
                    written.append(target)
        print(f"[demo] wrote {len(written)} image(s) to {out}")
        for path in written:
            print("   ", path)
        if not real:
            loud("weights")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
