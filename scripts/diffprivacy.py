#!/usr/bin/env python3
"""Diff-Privacy without ComfyUI: protect the face in a photo, or recover it from its keys.

    python scripts/diffprivacy.py protect --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --recognizer 20180402-114759-vggface2.pt --photo in.jpg --task anonymize --out out/ --keys face.dpkey
    python scripts/diffprivacy.py recover --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --keys face.dpkey --out recovered.png

The passphrase that encrypts the keys is read from $DIFF_PRIVACY_PASSPHRASE, else asked for on the terminal.
--tokenizer-dir is a folder with the SD1 CLIP tokenizer (vocab.json + merges.txt), e.g. ComfyUI's
comfy/sd1_tokenizer. Weights are only read from the given files; nothing is downloaded. Checkpoints may be
.safetensors/.sft or legacy .ckpt/.pt files (read without running any code they hold).

Everything that can be checked without the models is checked first, in this order, and reported as one line
with exit status 2: the files and folders named on the command line and a passphrase in $DIFF_PRIVACY_PASSPHRASE
(before torch is imported), the photo (decoded and size-checked), the checkpoint (damaged file, model family,
missing VAE or text encoder, read from its header), a typed passphrase and, for recover, the key file (decrypted).
Only then do the models load.
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
# Choices of --task / --crop, spelled out so that --help needs neither torch nor the core; they equal
# core.energies.MODES and core.pipeline.GUIDANCE_CROPS (tests/test_cli.py checks).
TASKS = ("anonymize", "hide")
GUIDANCE_CROPS = ("official", "ffhq", "whole", "detect")
# What the CLI needs beyond the nodes' requirements.txt: the `cli` extra of pyproject.toml, mirrored by
# requirements-cli.txt (module name -> distribution name).
CLI_MODULES = {"diffusers": "diffusers", "transformers": "transformers"}

# Bound by load_runtime() after the arguments are parsed, so that --help and usage errors stay fast.
torch = keyfile = load_photo = save_photo = ClipVisionEncoder = DiffusersBackend = DiffPrivacyError = None
MSIOptions = ProtectOptions = protect_photo = recover_face = load_recognizer = None
FaceCrop = RecognizerVerifier = load_sface = check_sd1_checkpoint = read_tensor_shapes = WrongPassphraseError = None


def missing_modules() -> list[str]:
    """Distributions the CLI needs that this Python cannot import (torch, then the `cli` extra)."""
    wanted = {"torch": "torch", "numpy": "numpy", "PIL": "Pillow", **CLI_MODULES}
    return [dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None]


def check_requirements() -> None:
    """Exit with the install command when a distribution the CLI needs is missing (imports nothing)."""
    missing = missing_modules()
    if missing:
        command = f"{sys.executable} -m pip install -r {REPO_ROOT / 'requirements-cli.txt'}"
        first = ("" if "torch" not in missing else
                 "install torch for your platform first (https://pytorch.org/get-started/locally/), then ")
        raise SystemExit(f"error: the Diff-Privacy CLI needs {', '.join(missing)}, which this Python lacks.\n"
                         f"The ComfyUI nodes do not use diffusers or transformers; the CLI does. To run it, "
                         f"{first}install the CLI's requirements:\n    {command}")


def load_runtime() -> None:
    """Import torch, the core and its diffusers backend (after :func:`check_requirements`)."""
    global torch, keyfile, load_photo, save_photo, ClipVisionEncoder, DiffusersBackend, DiffPrivacyError
    global MSIOptions, ProtectOptions, protect_photo, recover_face, load_recognizer
    global FaceCrop, RecognizerVerifier, load_sface
    global check_sd1_checkpoint, read_tensor_shapes, WrongPassphraseError
    import torch

    _core_on_path()
    from core import keyfile
    from core.checkpoint import check_sd1_checkpoint
    from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend
    from core.errors import DiffPrivacyError, WrongPassphraseError
    from core.msi import MSIOptions
    from core.photo_io import load_photo, save_photo
    from core.pipeline import ProtectOptions, protect_photo, recover_face
    from core.recognizers import FaceCrop, load_recognizer
    from core.verifiers import RecognizerVerifier, load_sface
    from core.weights import read_tensor_shapes


def _core_on_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# ------------------------------------------------------------------------------------ argument checks
def _file_problem(flag: str, path: str, what: str) -> str | None:
    target = Path(path)
    if not target.exists():
        return f"{flag} '{path}': no such file. Give the path of the {what}."
    if not target.is_file():
        return f"{flag} '{path}' is a folder, not a file. Give the path of the {what}."
    return None


def argument_problem(args) -> str | None:
    """The first problem with the files, folders and passphrase named on the command line, as one line naming the
    flag, or None. Needs neither torch nor any model (runs right after parsing)."""
    problems = [_file_problem("--checkpoint", args.checkpoint, "SD 1.x checkpoint (.safetensors or .ckpt)")]
    tokenizer = Path(args.tokenizer_dir)
    if not tokenizer.is_dir():
        problems.append(f"--tokenizer-dir '{args.tokenizer_dir}': no such folder. Give the folder holding the SD1 "
                        f"CLIP tokenizer's vocab.json and merges.txt (e.g. ComfyUI's comfy/sd1_tokenizer).")
    else:
        absent = [name for name in ("vocab.json", "merges.txt") if not (tokenizer / name).is_file()]
        if absent:
            problems.append(f"--tokenizer-dir '{args.tokenizer_dir}' has no {' or '.join(absent)}: give the folder "
                            f"of the SD1 CLIP tokenizer (e.g. ComfyUI's comfy/sd1_tokenizer).")
    if args.command == "protect":
        problems.append(_file_problem("--photo", args.photo, "photo with the face to protect"))
        problems.append(_file_problem("--recognizer", args.recognizer, "face recognizer weight file (.pt/.pth)"))
        if args.clip_vision:
            problems.append(_file_problem("--clip-vision", args.clip_vision, "CLIP ViT-L/14 vision weight file"))
        for spec in args.verify or []:
            if not Path(spec).exists():
                problems.append(f"--verify '{spec}': no such file or folder. Give an SFace/YuNet folder or a "
                                f"FaceNet/ArcFace weight file.")
        if Path(args.keys).exists():
            problems.append(f"--keys '{args.keys}' exists already; key files are never replaced (an existing one may "
                            f"be the only way to recover a face). Choose another name.")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            problems.append(f"--out '{args.out}' is a file; give a folder for the protected photos.")
    else:
        problems.append(_file_problem("--keys", args.keys, "key file written by protect (.dpkey)"))
        out = Path(args.out)
        if out.is_dir():
            problems.append(f"--out '{args.out}' is a folder; give the file name of the recovered face (.png).")
        elif not out.parent.is_dir():
            problems.append(f"--out '{args.out}': the folder '{out.parent}' does not exist. Create it first or give "
                            f"another path.")
    problems.append(_environment_passphrase_problem(args.command))
    return next((problem for problem in problems if problem), None)


def _environment_passphrase_problem(command: str) -> str | None:
    """New keys are never encrypted with a passphrase that starts or ends with an invisible character; for
    recover, such a passphrase is tried as given (and explained if it fails)."""
    secret = os.environ.get(PASSPHRASE_ENV)
    return _passphrase_format_problem(secret, f"${PASSPHRASE_ENV}") if command == "protect" and secret else None


def _passphrase_format_problem(secret: str, source: str) -> str | None:
    _core_on_path()
    from core.passphrase import invisible_edge

    edge = invisible_edge(secret)
    if edge is None:
        return None
    return (f"the passphrase in {source} {edge}. That is usually an invisible character copied along with it (a "
            f"trailing newline or space from a file or a copied line, or a zero-width space); it would be needed, "
            f"exactly, to open the key file again, so it is refused. Remove it from {source}.")


def passphrase(confirm: bool) -> tuple[str, str]:
    """(passphrase, where it came from): $DIFF_PRIVACY_PASSPHRASE, else asked for on the terminal (twice when
    ``confirm``, i.e. for new keys, whose passphrase must not start or end with an invisible character).

    Raises:
        PassphraseRequiredError: no variable and no terminal, or the two entries differ.
        PassphraseFormatError: a new passphrase starts or ends with whitespace or an invisible character.
    """
    from core.errors import PassphraseFormatError, PassphraseRequiredError

    secret = os.environ.get(PASSPHRASE_ENV)
    source = f"${PASSPHRASE_ENV}"
    if not secret:
        if not sys.stdin.isatty():
            raise PassphraseRequiredError(f"set {PASSPHRASE_ENV}: there is no terminal to ask for the key passphrase.")
        secret, source = getpass.getpass("key passphrase: "), "the passphrase you typed"
        if confirm and getpass.getpass("again: ") != secret:
            raise PassphraseRequiredError("the two passphrases you typed differ; nothing was done.")
    problem = _passphrase_format_problem(secret, source) if confirm else None
    if problem:
        raise PassphraseFormatError(problem[0].upper() + problem[1:])
    return secret, source


def open_keys(path: str, secret: str, source: str):
    """The key file's keys, decrypted (before any model loads); a wrong passphrase with an invisible character at
    either end is explained instead of sent to caps lock.

    Raises:
        core.errors.KeyFileError: every key-file problem, naming the file.
    """
    from core.passphrase import invisible_edge

    try:
        return keyfile.load_keys(path, secret)
    except WrongPassphraseError as exc:
        edge = invisible_edge(secret)
        if edge is None:
            raise
        raise WrongPassphraseError(
            f"The passphrase in {source} {edge} (probably copied along by mistake, e.g. a trailing newline from a "
            f"file) and does not open '{path}'. Remove that character and try again.") from exc


def check_checkpoint(path: str) -> None:
    """The checkpoint's framing, model family and parts, from its header (instant for safetensors), before any
    model is built (:func:`core.checkpoint.check_sd1_checkpoint`)."""
    check_sd1_checkpoint(read_tensor_shapes(path, what="SD1.x checkpoint"), f"--checkpoint '{path}'")


def backend_from(args) -> DiffusersBackend:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    return DiffusersBackend.from_single_file(args.checkpoint, tokenizer_dir=args.tokenizer_dir, device=device,
                                             dtype=dtype, vae_dtype=torch.float32)


def options_from(args, faithful: bool) -> ProtectOptions:
    """ProtectOptions from the command line: flags left out keep the task's preset values."""
    msi_overrides = {} if args.msi_steps is None else {"steps": args.msi_steps}
    sampling = {name: getattr(args, name) for name in ("steps", "strength", "batch_size", "seed")
                if getattr(args, name) is not None}
    return ProtectOptions.preset(args.task, size=args.size,
                                 msi=MSIOptions.preset("faithful" if faithful else "lite", **msi_overrides),
                                 inversion_steps=args.inversion_steps, sampling=sampling, crop=args.crop,
                                 step_scale=args.step_scale, max_identity_similarity=args.max_identity_similarity)


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
    photo = load_photo(args.photo)  # decoded, upright and size-checked before any model is loaded
    check_checkpoint(args.checkpoint)
    secret, _ = passphrase(confirm=True)  # before the expensive steps, not after them
    backend = backend_from(args)
    recognizer = load_recognizer(args.recognizer, "auto", device=backend.device)
    verifiers = verifiers_from(args, backend.device)
    vision = ClipVisionEncoder.from_file(args.clip_vision, device=backend.device) if args.clip_vision else None

    def show(stage: str, step: int, total: int) -> None:
        print(f"\r{stage:9s} {step:5d}/{total}", end="" if step < total else "\n", flush=True)

    result = protect_photo(backend, recognizer, photo, options, verifiers=verifiers, vision=vision, progress=show)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.photo).stem
    # only results that passed the identity gate reach this point; the keys go first, since a key file is
    # never replaced and an existing one stops the run before any image is written
    keyfile.save_keys(args.keys, result.keys, secret)
    for i, photo in enumerate(result.photos):
        save_photo(out / f"{stem}_{args.task}_{i:02d}.png", photo)
    (out / f"{stem}_{args.task}.report.json").write_text(result.report.to_json(), encoding="utf-8")
    print(result.report.summary())
    print(f"wrote {len(result.photos)} photo(s) and the privacy report to {out}; keys to {args.keys}")
    return 0


def recover(args) -> int:
    check_checkpoint(args.checkpoint)
    keys = open_keys(args.keys, *passphrase(confirm=False))  # decrypted before any model is loaded
    backend = backend_from(args)
    save_photo(Path(args.out), recover_face(backend, keys))
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("protect", "recover"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True,
                       help="SD1.x single-file checkpoint (.safetensors/.sft, or a legacy .ckpt/.pt)")
        p.add_argument("--tokenizer-dir", required=True, help="folder with the SD1 CLIP vocab.json + merges.txt")
        p.add_argument("--keys", required=True, help="recovery key file (written by protect, read by recover)")
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="UNet compute dtype")
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
    p.add_argument("--msi-steps", type=int)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--steps", type=int, help="DDIM grid (preset: 50 anonymize, 100 hide)")
    p.add_argument("--strength", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--crop", choices=GUIDANCE_CROPS, default="official")
    p.add_argument("--step-scale", type=float, default=1.0)
    p.add_argument("--max-identity-similarity", type=float, default=0.5)
    sub.choices["recover"].add_argument("--out", default="recovered.png")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check_requirements()  # after parsing: --help and usage errors import neither torch nor diffusers
    problem = argument_problem(args)  # files, folders, passphrase: before torch is even imported
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    load_runtime()
    try:
        return protect(args) if args.command == "protect" else recover(args)
    except DiffPrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
