"""scripts/diffprivacy.py starts without its heavy needs: --help imports neither torch nor diffusers, and a
Python without the CLI's extra requirements gets the install command instead of a traceback."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = REPO_ROOT / "scripts" / "diffprivacy.py"
HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "core")

# Runs the CLI as __main__ in a fresh interpreter; modules named in argv[1] (comma-separated) are made
# unimportable (sys.modules[name] = None is what importlib treats as "not installed"), argv[2:] go to the CLI.
RUNNER = """
import runpy, sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
script, sys.argv = sys.argv[2], sys.argv[2:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    loaded = sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None} & set(%r))
    print("LOADED=" + ",".join(loaded), file=sys.stderr)
""" % (HEAVY,)


def run_cli(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(block), str(CLI), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def loaded_modules(result: subprocess.CompletedProcess) -> list[str]:
    line = [x for x in result.stderr.splitlines() if x.startswith("LOADED=")][-1]
    return [x for x in line[len("LOADED="):].split(",") if x]


@pytest.mark.parametrize("args", [["--help"], ["protect", "--help"], ["recover", "--help"]])
def test_help_imports_neither_torch_nor_diffusers(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert loaded_modules(result) == [], result.stderr


def test_usage_errors_come_before_any_heavy_import():
    result = run_cli("protect", "--task", "nonsense")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert loaded_modules(result) == []


@pytest.mark.parametrize("block, named", [(("diffusers",), "diffusers"), (("diffusers", "transformers"),
                                                                          "diffusers, transformers"),
                                         (("torch",), "torch")])
def test_missing_cli_requirements_name_the_install_command(block, named, tmp_path):
    result = run_cli("recover", "--checkpoint", str(tmp_path / "x.safetensors"), "--tokenizer-dir", str(tmp_path),
                     "--keys", str(tmp_path / "k.dpkey"), block=block)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"needs {named}, which this Python lacks" in result.stderr
    assert f"-m pip install -r {REPO_ROOT / 'requirements-cli.txt'}" in result.stderr
    assert ("pytorch.org" in result.stderr) == (block == ("torch",))
    assert not set(loaded_modules(result)) & {"torch", "diffusers", "core"}


def test_cli_choices_equal_the_cores():
    """--task / --crop are spelled out in the CLI (so --help needs no torch); they must stay the core's."""
    spec = importlib.util.spec_from_file_location("diffprivacy_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    import torch

    from core.energies import MODES
    from core.msi import SPEEDS
    from core.pipeline import GUIDANCE_CROPS
    from core.cuda_graphs import GRAPH_SETTINGS
    from core.speed import COMPILE_SETTINGS, resolve_compute_dtype

    assert cli.TASKS == MODES
    assert cli.GUIDANCE_CROPS == GUIDANCE_CROPS
    assert cli.SPEEDS == SPEEDS and cli.COMPILE == COMPILE_SETTINGS and cli.CUDA_GRAPHS == GRAPH_SETTINGS
    assert [resolve_compute_dtype(name, "cpu") for name in cli.DTYPES] == [torch.float32, torch.float32,
                                                                          torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------ argument errors
def _setup(tmp_path):
    """A tokenizer folder, a photo, a recognizer file, a checkpoint and a key file: names only (contents unread)."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt", ):
        (tokenizer / name).write_text("{}")
    files = {name: tmp_path / name for name in ("face.jpg", "facenet.pt", "sd15.safetensors", "old.dpkey")}
    for path in files.values():
        path.write_bytes(b"x")
    return tokenizer, files


def _protect_args(tmp_path, **changes):
    tokenizer, files = _setup(tmp_path)
    args = {"--checkpoint": files["sd15.safetensors"], "--tokenizer-dir": tokenizer, "--keys": tmp_path / "new.dpkey",
            "--recognizer": files["facenet.pt"], "--photo": files["face.jpg"], "--out": tmp_path / "out"}
    args.update(changes)
    return ["protect"] + [str(x) for pair in args.items() for x in pair]


def _recover_args(tmp_path, **changes):
    tokenizer, files = _setup(tmp_path)
    args = {"--checkpoint": files["sd15.safetensors"], "--tokenizer-dir": tokenizer, "--keys": files["old.dpkey"],
            "--out": tmp_path / "recovered.png"}
    args.update(changes)
    return ["recover"] + [str(x) for pair in args.items() for x in pair]


@pytest.mark.parametrize("command, change, words", [
    ("protect", {"--photo": "missing.jpg"}, "--photo 'missing.jpg': no such file"),
    ("protect", {"--checkpoint": "nowhere/sd15.safetensors"}, "--checkpoint 'nowhere/sd15.safetensors': no such file"),
    ("protect", {"--recognizer": "vgg.pt"}, "--recognizer 'vgg.pt': no such file"),
    ("protect", {"--tokenizer-dir": "no-such-folder"}, "--tokenizer-dir 'no-such-folder': no such folder"),
    ("protect", {"--keys": "EXISTING"}, "exists already; key files are never replaced"),
    ("protect", {"--photo": "no-such-photo.jpg"}, "--photo 'no-such-photo.jpg': no such file or folder"),
    ("protect", {"--faces-per-batch": "0"}, "--faces-per-batch 0: give a number of faces ≥ 1"),
    ("protect", {"--guidance-decoder": "taesd_decoder.safetensors"},
     "--guidance-decoder 'taesd_decoder.safetensors': no such file"),
    ("recover", {"--keys": "lost.dpkey"}, "--keys 'lost.dpkey': no such file"),
    ("recover", {"--out": "no/such/folder/face.png"}, "the folder 'no/such/folder' does not exist"),
    ("recover", {"--out": "FOLDER"}, "is a folder; give the file name"),
])
def test_argument_errors_come_before_torch_as_one_line(tmp_path, command, change, words):
    change = {flag: {"EXISTING": str(tmp_path / "old.dpkey"), "FOLDER": str(tmp_path)}.get(value, value)
              for flag, value in change.items()}
    argv = (_protect_args if command == "protect" else _recover_args)(tmp_path, **change)
    result = run_cli(*argv)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("LOADED=")]
    assert lines == [f"error: {lines[0][len('error: '):]}"] and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not set(loaded_modules(result)) & {"torch", "diffusers", "PIL"}


@pytest.mark.parametrize("secret, words", [("a passphrase\n", "ends with U+000A"),
                                           (" a passphrase", "starts with U+0020 SPACE"),
                                           ("a passphrase\u200b", "ends with U+200B ZERO WIDTH SPACE")])
def test_protect_refuses_a_passphrase_with_invisible_edges(tmp_path, monkeypatch, secret, words):
    monkeypatch.setenv("DIFF_PRIVACY_PASSPHRASE", secret)
    result = run_cli(*_protect_args(tmp_path))
    assert result.returncode == 2 and words in result.stderr and "$DIFF_PRIVACY_PASSPHRASE" in result.stderr
    assert "caps lock" not in result.stderr and "Traceback" not in result.stderr
    assert not set(loaded_modules(result)) & {"torch", "diffusers"}
