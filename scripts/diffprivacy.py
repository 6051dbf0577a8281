#!/usr/bin/env python3
"""Diff-Privacy without ComfyUI: protect the face in a photo, or recover it from its keys.

    python scripts/diffprivacy.py protect --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --recognizer 20180402-114759-vggface2.pt --photo in.jpg --task anonymize --out out/ --keys face.dpkey
    python scripts/diffprivacy.py recover --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --keys face.dpkey --out recovered.png

The passphrase that encrypts the keys is read from $DIFF_PRIVACY_PASSPHRASE, else asked for on the terminal.
--tokenizer-dir is a folder with the SD1 CLIP tokenizer (vocab.json + merges.txt), e.g. ComfyUI's
comfy/sd1_tokenizer. Weights are only read from the given files; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import getpass
import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE_ENV = "DIFF_PRIVACY_PASSPHRASE"
# Choices of --task / --crop / --speed / --dtype / --compile, spelled out so that --help needs neither torch nor the core; they equal
# core.energies.MODES and core.pipeline.GUIDANCE_CROPS (tests/test_cli.py checks).
TASKS = ("anonymize", "hide")
GUIDANCE_CROPS = ("official", "ffhq", "whole", "detect")
# likewise core.msi.SPEEDS, the names core.speed.resolve_compute_dtype takes and core.speed.COMPILE_SETTINGS
SPEEDS = ("paper", "default", "fast")
DTYPES = ("auto", "fp32", "fp16", "bf16")
COMPILE = ("auto", "on", "off")
# What the CLI needs beyond the nodes' requirements.txt: the `cli` extra of pyproject.toml, mirrored by
# requirements-cli.txt (module name -> distribution name).
CLI_MODULES = {"diffusers": "diffusers", "transformers": "transformers"}

# Bound by load_runtime() after the arguments are parsed, so that --help and usage errors stay fast.
np = torch = Image = keyfile = ClipVisionEncoder = DiffusersBackend = DiffPrivacyError = None
MSIOptions = ProtectOptions = protect_photo = recover_face = load_recognizer = None
FaceCrop = RecognizerVerifier = load_sface = None


def missing_modules() -> list[str]:
    """Distributions the CLI needs that this Python cannot import (torch, then the `cli` extra)."""
    wanted = {"torch": "torch", "numpy": "numpy", "PIL": "Pillow", **CLI_MODULES}
    return [dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None]


def load_runtime() -> None:
    """Import torch, the core and its diffusers backend; exit with the install command when one is missing."""
    missing = missing_modules()
    if missing:
        command = f"{sys.executable} -m pip install -r {REPO_ROOT / 'requirements-cli.txt'}"
        first = ("" if "torch" not in missing else
                 "install torch for your platform first (https://pytorch.org/get-started/locally/), then ")
        raise SystemExit(f"error: the Diff-Privacy CLI needs {', '.join(missing)}, which this Python lacks.\n"
                         f"The ComfyUI nodes do not use diffusers or transformers; the CLI does. To run it, "
                         f"{first}install the CLI's requirements:\n    {command}")
    global np, torch, Image, keyfile, ClipVisionEncoder, DiffusersBackend, DiffPrivacyError
    global MSIOptions, ProtectOptions, protect_photo, recover_face, load_recognizer
    global FaceCrop, RecognizerVerifier, load_sface
    import numpy as np
    import torch
    from PIL import Image

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from core import keyfile
    from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend
    from core.errors import DiffPrivacyError
    from core.msi import MSIOptions
    from core.pipeline import ProtectOptions, protect_photo, recover_face
    from core.recognizers import FaceCrop, load_recognizer
    from core.verifiers import RecognizerVerifier, load_sface


def passphrase(confirm: bool) -> str:
    secret = os.environ.get(PASSPHRASE_ENV)
    if secret:
        return secret
    if not sys.stdin.isatty():
        raise SystemExit(f"set {PASSPHRASE_ENV} (no terminal to ask for the key passphrase)")
    secret = getpass.getpass("key passphrase: ")
    if confirm and getpass.getpass("again: ") != secret:
        raise SystemExit("the passphrases differ")
    return secret


def read_photo(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def write_image(path: Path, pixels: torch.Tensor) -> None:
    Image.fromarray((pixels.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)).save(path)


def backend_from(args) -> DiffusersBackend:
    """The diffusers backend on --device with --dtype / --vae-dtype ("auto": bfloat16 on a CUDA device with bf16,
    float16 on older CUDA devices, float32 on a CPU; the VAE never runs in float16, whose range the SD VAE
    decoder's activations can exceed: it gets bfloat16 where available, else float32) and --compile."""
    from core.speed import resolve_compute_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_compute_dtype(args.dtype, device)
    vae_dtype = resolve_compute_dtype(args.vae_dtype, device)
    if vae_dtype == torch.float16:
        vae_dtype = torch.bfloat16 if resolve_compute_dtype("auto", device) == torch.bfloat16 else torch.float32
    return DiffusersBackend.from_single_file(args.checkpoint, tokenizer_dir=args.tokenizer_dir, device=device,
                                             dtype=dtype, vae_dtype=vae_dtype, compile_unet=args.compile)


def options_from(args, faithful: bool) -> ProtectOptions:
    """ProtectOptions from the command line: flags left out keep the values of the task's --speed preset."""
    msi_overrides = {} if args.msi_steps is None else {"steps": args.msi_steps}
    sampling = {name: getattr(args, name) for name in ("steps", "strength", "batch_size", "seed")
                if getattr(args, name) is not None}
    given = {name: getattr(args, name) for name in ("inversion_steps", "step_scale") if getattr(args, name) is not None}
    return ProtectOptions.preset(args.task, args.speed, size=args.size,
                                 msi=MSIOptions.preset("faithful" if faithful else "lite", args.speed, **msi_overrides),
                                 sampling=sampling, crop=args.crop,
                                 max_identity_similarity=args.max_identity_similarity, **given)


def verifiers_from(args, device) -> list:
    """One verifier per --verify: a folder holding OpenCV's SFace + YuNet ONNX files, or a FaceNet / ArcFace
    weight file judged at --max-identity-similarity."""
    verifiers = []
    for spec in args.verify or []:
        if Path(spec).is_dir():
            verifiers.append(load_sface([spec]))
        else:
            judge = load_recognizer(spec, "auto", device=device)
            verifiers.append(RecognizerVerifier(judge, FaceCrop.official(judge), args.max_identity_similarity))
    return verifiers


def protect(args) -> int:
    try:  # settings are checked before any model is loaded
        options = options_from(args, faithful=args.clip_vision is not None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    secret = passphrase(confirm=True)  # before the expensive steps, not after them
    backend = backend_from(args)
    recognizer = load_recognizer(args.recognizer, "auto", device=backend.device)
    verifiers = verifiers_from(args, backend.device)
    vision = ClipVisionEncoder.from_file(args.clip_vision, device=backend.device) if args.clip_vision else None

    def show(stage: str, step: int, total: int) -> None:
        print(f"\r{stage:9s} {step:5d}/{total}", end="" if step < total else "\n", flush=True)

    result = protect_photo(backend, recognizer, read_photo(args.photo), options, verifiers=verifiers, vision=vision,
                           progress=show)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.photo).stem
    # only results that passed the identity gate reach this point; the keys go first, since a key file is
    # never replaced and an existing one stops the run before any image is written
    keyfile.save_keys(args.keys, result.keys, secret)
    for i, photo in enumerate(result.photos):
        write_image(out / f"{stem}_{args.task}_{i:02d}.png", photo)
    (out / f"{stem}_{args.task}.report.json").write_text(result.report.to_json(), encoding="utf-8")
    print(result.report.summary())
    print(f"wrote {len(result.photos)} photo(s) and the privacy report to {out}; keys to {args.keys}")
    return 0


def recover(args) -> int:
    backend = backend_from(args)
    keys = keyfile.load_keys(args.keys, passphrase(confirm=False))
    write_image(Path(args.out), recover_face(backend, keys))
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("protect", "recover"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True, help="SD1.x single-file checkpoint (.safetensors)")
        p.add_argument("--tokenizer-dir", required=True, help="folder with the SD1 CLIP vocab.json + merges.txt")
        p.add_argument("--keys", required=True, help="recovery key file (written by protect, read by recover)")
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="UNet weights (auto: bf16 on a CUDA GPU with bf16, else fp16 on CUDA, fp32 on a CPU)")
        p.add_argument("--vae-dtype", choices=DTYPES, default="auto",
                       help="VAE weights (auto: bf16 on a CUDA GPU with bf16, else fp32; fp16 is taken as bf16/fp32)")
        p.add_argument("--compile", choices=COMPILE, default="off",
                       help="torch.compile the UNet step on CUDA (costs a minute or two the first time per shape; "
                            "off with a log line where it cannot run)")
    p = sub.choices["protect"]
    p.add_argument("--recognizer", required=True, help="FaceNet .pt or ArcFace IR-SE50 .pth")
    p.add_argument("--verify", action="append", metavar="PATH",
                   help="an independent verifier for the identity gate (repeatable): a folder with OpenCV's SFace "
                        "and YuNet .onnx files (needs opencv-python-headless), or a FaceNet/ArcFace weight file")
    p.add_argument("--photo", required=True)
    p.add_argument("--task", choices=TASKS, default="anonymize")
    p.add_argument("--out", default="protected")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--clip-vision", help="CLIP ViT-L/14 vision weights: faithful MSI (default: lite)")
    p.add_argument("--speed", choices=SPEEDS, default="default",
                   help="preset (README, Speed): paper = the release's batch-1 MSI steps in fp32; default = the same "
                        "MSI timesteps 4 per step; fast = fewer MSI timesteps and half the sampling grid (every "
                        "result still passes the identity gate)")
    p.add_argument("--msi-steps", type=int)
    p.add_argument("--inversion-steps", type=int, help="DDIM steps of key-I (default 50)")
    p.add_argument("--steps", type=int, help="DDIM grid (preset: 50 anonymize, 100 hide)")
    p.add_argument("--strength", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--crop", choices=GUIDANCE_CROPS, default="official")
    p.add_argument("--step-scale", type=float, help="factor on the guidance step sizes (preset: 1; fast: 2)")
    p.add_argument("--max-identity-similarity", type=float, default=0.5)
    sub.choices["recover"].add_argument("--out", default="recovered.png")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    load_runtime()  # after parsing: --help and usage errors import neither torch nor diffusers
    try:
        return protect(args) if args.command == "protect" else recover(args)
    except DiffPrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
