#!/usr/bin/env python3
"""Diff-Privacy without ComfyUI: protect every face in photos, or recover a photo from its keys.

    python scripts/diffprivacy.py protect --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --recognizer 20180402-114759-vggface2.pt --photo group.jpg --out out/ --keys group.dpkey
    python scripts/diffprivacy.py protect ... --photo albums/ --recursive --out out/ --keys keys/
    python scripts/diffprivacy.py recover --checkpoint SD15.safetensors --tokenizer-dir DIR \\
        --keys group.dpkey --photo out/group_anonymize_00.png --out recovered.png

protect takes photo files and folders (--recursive descends into subfolders). One photo file with a --keys file
name writes that key file; otherwise --keys is a folder and each photo gets <name>_<task>.dpkey there, mirroring
the photo's place under the folder given, next to <out>/<name>_<task>_NN.png and <name>_<task>.report.json. The
report is written last: a photo whose report exists is skipped when the command runs again (resume). A photo
that fails (no face, a face that cannot be processed, the identity gate) is listed at the end and the others go
on; the exit status is then 1.

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
from typing import NamedTuple
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE_ENV = "DIFF_PRIVACY_PASSPHRASE"
# Choices of --task / --crop / --speed / --dtype / --compile / --cuda-graphs, spelled out so that --help needs neither torch nor the core; they equal
# core.energies.MODES and core.pipeline.GUIDANCE_CROPS (tests/test_cli.py checks).
TASKS = ("anonymize", "hide")
GUIDANCE_CROPS = ("official", "ffhq", "whole", "detect")
# likewise core.msi.SPEEDS, the names core.speed.resolve_compute_dtype takes, core.speed.COMPILE_SETTINGS and
# core.cuda_graphs.GRAPH_SETTINGS (both core.speed.SWITCH_SETTINGS)
SPEEDS = ("paper", "default", "fast")
DTYPES = ("auto", "fp32", "fp16", "bf16")
COMPILE = ("auto", "on", "off")
CUDA_GRAPHS = COMPILE  # the same three switch values (core.speed.SWITCH_SETTINGS)
# What the CLI needs beyond the nodes' requirements.txt: the `cli` extra of pyproject.toml, mirrored by
# requirements-cli.txt (module name -> distribution name).
CLI_MODULES = {"diffusers": "diffusers", "transformers": "transformers", "tqdm": "tqdm"}
#: photo file types protect picks up in folders (what Pillow decodes; other files in a folder are ignored)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: --faces choices: core.selection.SELECTION_MODES under shorter names
FACE_MODES = {"all": "all", "largest": "largest", "index": "index", "match": "match_reference",
              "except": "except_reference"}
FALLBACKS = ("fail", "blur", "fill")

# Bound by load_runtime() after the arguments are parsed, so that --help and usage errors stay fast.
torch = keyfile = load_photo = save_photo = ClipVisionEncoder = DiffusersBackend = DiffPrivacyError = None
MSIOptions = ProtectOptions = protect_photo = recover_faces = recover_photo = load_recognizer = None
TinyGuidanceDecoder = None
FaceSelection = tqdm = None
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
    global MSIOptions, ProtectOptions, protect_photo, recover_faces, recover_photo, load_recognizer
    global FaceSelection, tqdm, TinyGuidanceDecoder
    global FaceCrop, RecognizerVerifier, load_sface
    global check_sd1_checkpoint, read_tensor_shapes, WrongPassphraseError
    import torch

    _core_on_path()
    from core import keyfile
    from core.checkpoint import check_sd1_checkpoint
    from core.diffusers_backend import ClipVisionEncoder, DiffusersBackend, TinyGuidanceDecoder
    from core.errors import DiffPrivacyError, WrongPassphraseError
    from core.msi import MSIOptions
    from core.photo_io import load_photo, save_photo
    from core.pipeline import ProtectOptions, protect_photo, recover_faces, recover_photo
    from core.selection import FaceSelection
    from tqdm import tqdm
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
        for photo in args.photo:
            if not Path(photo).exists():
                problems.append(f"--photo '{photo}': no such file or folder. Give a photo, or a folder of photos.")
        if args.reference:
            problems.append(_file_problem("--reference", args.reference, "photo of the person to match"))
        if args.faces in ("match", "except") and not args.reference:
            problems.append(f"--faces {args.faces} compares faces with a photo of the person: give --reference.")
        if getattr(args, "faces_per_batch", None) is not None and args.faces_per_batch < 1:
            problems.append(f"--faces-per-batch {args.faces_per_batch}: give a number of faces ≥ 1 (or leave it out "
                            f"to fit as many as memory allows).")
        if args.faces == "index" and not args.face_numbers:
            problems.append("--faces index needs --face-numbers (e.g. 1,3; numbers as in the preview).")
        problems.append(_file_problem("--recognizer", args.recognizer, "face recognizer weight file (.pt/.pth)"))
        if args.clip_vision:
            problems.append(_file_problem("--clip-vision", args.clip_vision, "CLIP ViT-L/14 vision weight file"))
        if args.guidance_decoder:
            problems.append(_file_problem("--guidance-decoder", args.guidance_decoder,
                                          "TAESD decoder file (ComfyUI's models/vae_approx/taesd_decoder.safetensors)"))
        for spec in args.verify or []:
            if not Path(spec).exists():
                problems.append(f"--verify '{spec}': no such file or folder. Give an SFace/YuNet folder or a "
                                f"FaceNet/ArcFace weight file.")
        if single_key_file(args) and Path(args.keys).exists():
            problems.append(f"--keys '{args.keys}' exists already; key files are never replaced (an existing one may "
                            f"be the only way to recover a face). Choose another name.")
        elif not single_key_file(args) and Path(args.keys).is_file():
            problems.append(f"--keys '{args.keys}' is a file, but several photos need a folder of key files: give "
                            f"a folder.")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            problems.append(f"--out '{args.out}' is a file; give a folder for the protected photos.")
    else:
        problems.append(_file_problem("--keys", args.keys, "key file written by protect (.dpkey)"))
        if args.photo:
            problems.append(_file_problem("--photo", args.photo, "protected photo, as protect wrote it"))
        out = Path(args.out)
        if out.is_dir():
            problems.append(f"--out '{args.out}' is a folder; give the file name of the recovered face (.png).")
        elif not out.parent.is_dir():
            problems.append(f"--out '{args.out}': the folder '{out.parent}' does not exist. Create it first or give "
                            f"another path.")
    problems.append(_environment_passphrase_problem(args.command))
    return next((problem for problem in problems if problem), None)


def single_key_file(args) -> bool:
    """protect with one photo file and a --keys that is not a folder: --keys names the key file itself."""
    return (len(args.photo) == 1 and Path(args.photo[0]).is_file() and not Path(args.keys).is_dir()
            and not args.keys.endswith(("/", os.sep)))


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
        return keyfile.load_photo_keys(path, secret)
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
    """The diffusers backend on --device with --dtype / --vae-dtype ("auto": bfloat16 on a CUDA device with bf16,
    float16 on older CUDA devices, float32 on a CPU; the VAE never runs in float16, whose range the SD VAE
    decoder's activations can exceed: it gets bfloat16 where available, else float32), --compile and
    --cuda-graphs."""
    from core.speed import resolve_compute_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_compute_dtype(args.dtype, device)
    vae_dtype = resolve_compute_dtype(args.vae_dtype, device)
    if vae_dtype == torch.float16:
        vae_dtype = torch.bfloat16 if resolve_compute_dtype("auto", device) == torch.bfloat16 else torch.float32
    return DiffusersBackend.from_single_file(args.checkpoint, tokenizer_dir=args.tokenizer_dir, device=device,
                                             dtype=dtype, vae_dtype=vae_dtype, compile_unet=args.compile,
                                             cuda_graphs=args.cuda_graphs)


def options_from(args, faithful: bool) -> ProtectOptions:
    """ProtectOptions from the command line: flags left out keep the values of the task's --speed preset."""
    msi_overrides = {} if args.msi_steps is None else {"steps": args.msi_steps}
    sampling = {name: getattr(args, name) for name in ("steps", "strength", "batch_size", "seed")
                if getattr(args, name) is not None}
    given = {name: getattr(args, name) for name in ("inversion_steps", "step_scale", "faces_per_batch")
             if getattr(args, name) is not None}
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


# ------------------------------------------------------------------------------------------- batch jobs
class PhotoJob(NamedTuple):
    """One photo of a protect run and where its results go: ``<out_dir>/<name>_NN.png`` (one per sample),
    ``<out_dir>/<name>.report.json`` (written last: it marks the photo as done) and the key file ``keys``."""

    source: Path
    out_dir: Path
    name: str
    keys: Path

    def image(self, sample: int) -> Path:
        return self.out_dir / f"{self.name}_{sample:02d}.png"

    @property
    def report(self) -> Path:
        return self.out_dir / f"{self.name}.report.json"


def find_photos(paths: list[str], recursive: bool) -> list[tuple[Path, Path]]:
    """(photo file, its path relative to the folder it was found in — or its name, for a file given directly),
    sorted within each folder; only :data:`PHOTO_SUFFIXES` files are picked up in folders."""
    found: list[tuple[Path, Path]] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((given, Path(given.name)))
            continue
        pattern = given.rglob("*") if recursive else given.glob("*")
        files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        found += [(p, p.relative_to(given)) for p in files]
    return found


def plan_jobs(args) -> list[PhotoJob]:
    """Every photo's job with stable names: ``<photo name>_<task>`` under --out (and --keys for a folder of key
    files), in the photo's subfolder; photos that would share a name (a.jpg and a.png) keep their extension in
    it."""
    photos = find_photos(args.photo, args.recursive)
    stems: dict[Path, int] = {}
    for _, rel in photos:
        key = rel.parent / rel.stem
        stems[key] = stems.get(key, 0) + 1
    jobs = []
    for source, rel in photos:
        stem = rel.stem if stems[rel.parent / rel.stem] == 1 else f"{rel.stem}_{rel.suffix.lstrip('.').lower()}"
        name = f"{stem}_{args.task}"
        keys = Path(args.keys) if single_key_file(args) else Path(args.keys) / rel.parent / f"{name}.dpkey"
        jobs.append(PhotoJob(source, Path(args.out) / rel.parent, name, keys))
    return jobs


def selection_from(args) -> FaceSelection:
    numbers = FaceSelection.parse_numbers(args.face_numbers) if args.face_numbers else ()
    return FaceSelection(FACE_MODES[args.faces], numbers=numbers if args.faces == "index" else (),
                         threshold=args.match_threshold, fallback=args.fallback)


class StageBars:
    """A progress callback ``(stage, step, total)`` drawing one tqdm bar per stage ("face 2/3: msi", …) under
    the photos' bar; each bar closes when its stage ends."""

    def __init__(self, disable: bool):
        self.disable = disable
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, step: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False, position=1,
                                          disable=self.disable, file=sys.stderr)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def protect_one(job: PhotoJob, models: tuple, options, selection, reference, secret: str, progress) -> str:
    """Protect one photo and write its key file, images and report (in that order; nothing before the gate has
    passed for every face). Returns the report's summary.

    Raises:
        DiffPrivacyError: the photo cannot be used, a face cannot be processed, or the gate failed.
        KeyFileExistsError: a key file of that name exists without the photo's report (an interrupted run).
    """
    backend, recognizer, verifiers, vision, guidance_decoder = models
    if job.keys.exists():
        raise keyfile.KeyFileExistsError(
            17, f"the key file '{job.keys}' exists but the photo's report does not (an interrupted run?); key "
                f"files are never replaced: move it away to protect this photo again", str(job.keys))
    photo = load_photo(job.source)
    result = protect_photo(backend, recognizer, photo, options, selection=selection, reference=reference,
                           verifiers=verifiers, vision=vision, guidance_decoder=guidance_decoder, progress=progress)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    if result.keys is not None:  # only fallbacks (obscured faces) leave nothing to recover
        job.keys.parent.mkdir(parents=True, exist_ok=True)
        keyfile.save_keys(job.keys, result.keys, secret)
    for i, image in enumerate(result.photos):
        save_photo(job.image(i), image)
    job.report.write_text(result.report.to_json(), encoding="utf-8")
    return result.report.summary()


def protect(args) -> int:
    """Exit status: 0 when every photo is protected (or was already), 1 when some failed and 2 when all did or
    the run could not start."""
    try:  # settings are checked before any model is loaded
        options = options_from(args, faithful=args.clip_vision is not None)
        selection = selection_from(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = plan_jobs(args)
    if not jobs:
        print(f"error: no photos ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(args.photo)}"
              + ("" if args.recursive else " (add --recursive for subfolders)"), file=sys.stderr)
        return 2
    done = [job for job in jobs if job.report.exists()]
    todo = [job for job in jobs if not job.report.exists()]
    failures: list[tuple[PhotoJob, str]] = []
    for job in list(todo):  # decoded, upright and size-checked before any model is loaded
        try:
            load_photo(job.source)
        except DiffPrivacyError as err:
            failures.append((job, str(err)))
            todo.remove(job)
    reference = load_photo(args.reference) if args.reference else None
    if done:
        print(f"{len(done)} photo(s) already protected (their reports exist): skipped", file=sys.stderr)
    if todo:
        check_checkpoint(args.checkpoint)
        secret, _ = passphrase(confirm=True)  # before the expensive steps, not after them
        backend = backend_from(args)
        recognizer = load_recognizer(args.recognizer, "auto", device=backend.device)
        verifiers = verifiers_from(args, backend.device)
        vision = ClipVisionEncoder.from_file(args.clip_vision, device=backend.device) if args.clip_vision else None
        guidance_decoder = (TinyGuidanceDecoder.from_file(args.guidance_decoder, device=backend.device)
                            if args.guidance_decoder else None)
        models = (backend, recognizer, verifiers, vision, guidance_decoder)
        quiet = args.quiet or not sys.stderr.isatty()
        photos_bar = tqdm(todo, desc="photos", unit="photo", position=0, disable=quiet, file=sys.stderr)
        for job in photos_bar:
            bars = StageBars(disable=quiet)
            try:
                summary = protect_one(job, models, options, selection, reference, secret, bars)
            except (DiffPrivacyError, OSError) as err:
                failures.append((job, str(err)))
                continue
            finally:
                bars.close()
            tqdm.write(f"{job.source}: protected\n{summary}", file=sys.stdout)
    protected = len(todo) - sum(1 for job, _ in failures if job in todo)
    if len(jobs) == 1 and failures:  # one photo: its error, as one line
        print(f"error: {failures[0][1]}", file=sys.stderr)
        return 2
    print(f"protected {protected} photo(s), {len(done)} already done, {len(failures)} failed; outputs in "
          f"{args.out}", file=sys.stderr)
    for job, message in failures:
        print(f"error: {job.source}: {message}", file=sys.stderr)
    if not failures:
        return 0
    return 2 if not protected and not done else 1


def recover(args) -> int:
    check_checkpoint(args.checkpoint)
    protected = load_photo(args.photo) if args.photo else None  # checked before any model is loaded
    keys = open_keys(args.keys, *passphrase(confirm=False))  # decrypted before any model is loaded
    backend = backend_from(args)
    out = Path(args.out)
    if protected is None:  # the aligned face crops (all an older single-face key file can give)
        for i, crop in enumerate(recover_faces(backend, keys.faces)):  # every face in one batch
            path = out if len(keys.faces) == 1 else out.with_name(f"{out.stem}_face{i + 1}{out.suffix}")
            save_photo(path, crop)
            print(f"wrote {path}")
        return 0
    result = recover_photo(backend, keys, protected)
    save_photo(out, result.photo)
    print(f"wrote {out} ({len(keys.faces)} face(s) restored)")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("protect", "recover"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True,
                       help="SD1.x single-file checkpoint (.safetensors/.sft, or a legacy .ckpt/.pt)")
        p.add_argument("--tokenizer-dir", required=True, help="folder with the SD1 CLIP vocab.json + merges.txt")
        p.add_argument("--keys", required=True,
                       help="recovery key file (protect: for one photo file; else a folder of key files)")
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="UNet weights (auto: bf16 on a CUDA GPU with bf16, else fp16 on CUDA, fp32 on a CPU)")
        p.add_argument("--vae-dtype", choices=DTYPES, default="auto",
                       help="VAE weights (auto: bf16 on a CUDA GPU with bf16, else fp32; fp16 is taken as bf16/fp32)")
        p.add_argument("--compile", choices=COMPILE, default="off",
                       help="torch.compile the UNet step on CUDA (costs a minute or two the first time per shape; "
                            "off with a log line where it cannot run)")
        p.add_argument("--cuda-graphs", choices=CUDA_GRAPHS, default="auto",
                       help="replay the UNet step as CUDA graphs inside each loop, each graph checked against the "
                            "eager step first (auto: on a CUDA GPU with at least 6 GiB free and 3x the activations of "
                            "an MSI step; on: also with less memory; off: never; a CPU, UNet checkpointing or a "
                            "failed check keep the step eager either way)")
    p = sub.choices["protect"]
    p.add_argument("--recognizer", required=True, help="FaceNet .pt or ArcFace IR-SE50 .pth")
    p.add_argument("--verify", action="append", metavar="PATH",
                   help="an independent verifier for the identity gate (repeatable): a folder with OpenCV's SFace "
                        "and YuNet .onnx files (needs opencv-python-headless), or a FaceNet/ArcFace weight file")
    p.add_argument("--photo", required=True, action="append",
                   help="a photo or a folder of photos (repeatable); every face in them is protected")
    p.add_argument("--recursive", action="store_true", help="also take photos in subfolders of --photo folders")
    p.add_argument("--faces", choices=list(FACE_MODES), default="all",
                   help="which faces: all (default), the largest, by number (--face-numbers), those matching "
                        "--reference (match) or everyone except them (except)")
    p.add_argument("--face-numbers", default="", help="for --faces index: numbers in reading order, e.g. 1,3 or 2-4")
    p.add_argument("--reference", help="a photo of the person, for --faces match / except")
    p.add_argument("--match-threshold", type=float,
                   help="cosine at or above which a face matches --reference (default: the judge's own bound)")
    p.add_argument("--fallback", choices=FALLBACKS, default="fail",
                   help="a face too small or cut by the border: fail (list it, write nothing for that photo), "
                        "or blur / fill its region")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--task", choices=TASKS, default="anonymize")
    p.add_argument("--out", default="protected")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--clip-vision", help="CLIP ViT-L/14 vision weights: faithful MSI (default: lite)")
    p.add_argument("--speed", choices=SPEEDS, default="default",
                   help="preset (README, Speed): paper = the release's batch-1 MSI steps in fp32; default = the same "
                        "MSI timesteps 4 per step; fast = fewer MSI timesteps and half the sampling grid (every "
                        "result still passes the identity gate)")
    p.add_argument("--msi-steps", type=int)
    p.add_argument("--guidance-decoder", metavar="FILE",
                   help="TAESD decoder (ComfyUI's models/vae_approx/taesd_decoder.safetensors) for the guidance "
                        "gradient only: much cheaper guided steps; results are still decoded and judged through "
                        "the checkpoint's VAE (default: the checkpoint's VAE for both)")
    p.add_argument("--faces-per-batch", type=int,
                   help="faces of a photo run together through MSI, inversion and sampling (default: as many as "
                        "fit into free memory; 1 uses the least memory; the results are the same)")
    p.add_argument("--inversion-steps", type=int, help="DDIM steps of key-I (default 50)")
    p.add_argument("--steps", type=int, help="DDIM grid (preset: 50 anonymize, 100 hide)")
    p.add_argument("--strength", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--crop", choices=GUIDANCE_CROPS, default="official")
    p.add_argument("--step-scale", type=float, help="factor on the guidance step sizes (preset: 1; fast: 2)")
    p.add_argument("--max-identity-similarity", type=float, default=0.5)
    sub.choices["recover"].add_argument("--out", default="recovered.png")
    sub.choices["recover"].add_argument("--photo", help="the protected photo as protect wrote it: restores the whole "
                                                        "original photo (without it: the aligned face crops)")
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
