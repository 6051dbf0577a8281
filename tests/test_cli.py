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
    from core.speed import COMPILE_SETTINGS, resolve_compute_dtype

    assert cli.TASKS == MODES
    assert cli.GUIDANCE_CROPS == GUIDANCE_CROPS
    assert cli.SPEEDS == SPEEDS and cli.COMPILE == COMPILE_SETTINGS
    assert [resolve_compute_dtype(name, "cpu") for name in cli.DTYPES] == [torch.float32, torch.float32,
                                                                          torch.float16, torch.bfloat16]
