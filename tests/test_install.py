"""Installing the pack's requirements must never touch the user's torch stack.

ComfyUI users install custom-node requirements into the same environment that runs ComfyUI, through
ComfyUI-Manager or ``pip install -r requirements.txt``. Those environments carry a hand-picked torch build
(CUDA, ROCm, MPS, nightly...), so a requirement that makes pip replace torch, torchvision, numpy or Pillow
breaks the user's install. facenet-pytorch 2.6 is the known offender (it pins torch<2.3, numpy<2, Pillow<10.3).

The command-line tool's extra needs (diffusers, transformers) live in requirements-cli.txt, the mirror of the
pyproject ``cli`` extra; the nodes must not import them, so ComfyUI users never need that file.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.prerequisites import missing, require_module

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO_ROOT / "requirements.txt"
REQUIREMENTS_CLI = REPO_ROOT / "requirements-cli.txt"
PYPROJECT = REPO_ROOT / "pyproject.toml"
USER_STACK = ("torch", "torchvision", "numpy", "pillow")  # what a ComfyUI install already has
COMFYUI_PROVIDED = {"torch", "torchvision"}  # named in pyproject, never in requirements.txt
# Signs in pip's output that the package index could not be reached at all (not that resolution failed).
OFFLINE_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                   "Name or service not known", "Network is unreachable", "ConnectTimeoutError",
                   "Could not fetch URL", "No route to host")


def read_requirements_file(path: Path) -> tuple[list[str], list[Requirement]]:
    """(files named by ``-r`` lines, requirement lines) of a requirements file; comments and blank lines are
    dropped and ``-r FILE`` is the only pip option allowed."""
    includes, requirements = [], []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith("-r "):
            includes.append(line[3:].strip())
            continue
        assert not line.startswith("-"), f"{path.name}:{number}: pip options do not belong here: {line!r}"
        requirements.append(Requirement(line))
    return includes, requirements


def read_requirements_txt(path: Path = REQUIREMENTS) -> list[Requirement]:
    """Requirement lines of requirements.txt, which may include no other file."""
    includes, requirements = read_requirements_file(path)
    assert not includes, f"{path.name} must stand alone (ComfyUI-Manager reads it as it is): -r {includes}"
    return requirements


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = require_module("tomli", "Python 3.10 reads pyproject.toml through it; pip install tomli")
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def read_pyproject_dependencies() -> list[Requirement]:
    return [Requirement(item) for item in _pyproject()["project"]["dependencies"]]


def read_pyproject_extra(name: str) -> list[Requirement]:
    return [Requirement(item) for item in _pyproject()["project"]["optional-dependencies"][name]]


def _same(a: Requirement, b: Requirement) -> bool:
    return (a.specifier, a.extras, str(a.marker)) == (b.specifier, b.extras, str(b.marker))


def by_name(requirements: list[Requirement]) -> dict[str, Requirement]:
    table = {}
    for requirement in requirements:
        key = canonicalize_name(requirement.name)
        assert key not in table, f"{requirement.name} is listed twice"
        table[key] = requirement
    return table


def test_requirements_txt_mirrors_pyproject():
    txt = by_name(read_requirements_txt())
    project = by_name(read_pyproject_dependencies())
    assert COMFYUI_PROVIDED <= set(project), "pyproject should still declare torch and torchvision"
    for name in COMFYUI_PROVIDED:
        assert name not in txt, f"{name} must not be in requirements.txt: pip could replace the user's build"
        assert not project[name].specifier and not project[name].marker, f"{name} must stay unpinned"
    assert set(txt) == set(project) - COMFYUI_PROVIDED
    for name, requirement in txt.items():
        other = project[name]
        assert _same(requirement, other), f"{name}: {requirement} != {other}"


def test_requirements_cli_mirrors_the_cli_extra():
    """requirements-cli.txt = ``-r requirements.txt`` + exactly the pyproject ``cli`` extra, which adds only
    what the nodes' requirements lack."""
    includes, own = read_requirements_file(REQUIREMENTS_CLI)
    assert includes == ["requirements.txt"], includes
    cli_txt, cli_extra = by_name(own), by_name(read_pyproject_extra("cli"))
    assert set(cli_txt) == set(cli_extra) == {"diffusers", "transformers", "tqdm"}
    for name, requirement in cli_txt.items():
        assert _same(requirement, cli_extra[name]), f"{name}: {requirement} != {cli_extra[name]}"
    assert not set(cli_extra) & set(by_name(read_pyproject_dependencies())), "the cli extra repeats a base need"


CLI_ONLY_MODULES = ("diffusers", "transformers", "tqdm")


def _imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of every module ``path`` imports, at any depth (lazy imports in functions too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_nodes_never_import_the_cli_extra():
    """The nodes run on requirements.txt alone: nothing ComfyUI loads (the package root, nodes/, core/ except
    the CLI's backend) imports diffusers, transformers or core.diffusers_backend, not even lazily."""
    files = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "nodes").rglob("*.py")),
             *sorted(p for p in (REPO_ROOT / "core").rglob("*.py") if p.name != "diffusers_backend.py")]
    offences = []
    for path in files:
        rel = path.relative_to(REPO_ROOT)
        package = ".".join(("pack",) + rel.parent.parts)  # "pack" stands for the repo root package
        for name in _imported_modules(path, package):
            top = name.split(".")[0]
            if top in CLI_ONLY_MODULES or name.endswith("core.diffusers_backend") or name == "core.diffusers_backend":
                offences.append(f"{rel}: {name}")
    assert len(files) > 10, files
    assert not offences, "imports only the CLI may make:\n" + "\n".join(offences)


def test_import_scan_sees_lazy_and_relative_imports(tmp_path):
    """Control for the scan above: the forms it must catch are caught."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from diffusers import UNet2DConditionModel\n"
                      "from ..core import diffusers_backend\nfrom ..core.diffusers_backend import X\n"
                      "import transformers.models\n", encoding="utf-8")
    names = _imported_modules(sample, "pack.nodes")
    assert {"diffusers", "pack.core.diffusers_backend", "transformers.models"} <= set(names), names


@pytest.mark.parametrize("source", ["requirements.txt", "pyproject.toml"])
def test_facenet_pytorch_is_held_below_2_6(source):
    requirements = by_name(read_requirements_txt() if source == "requirements.txt" else read_pyproject_dependencies())
    spec = requirements["facenet-pytorch"].specifier
    assert spec.contains("2.5.3")
    for version in ("2.6.0", "2.6.1", "2.6.0rc1", "2.7.0", "3.0.0"):
        assert not spec.contains(version, prereleases=True), f"{source} allows facenet-pytorch {version}"


def test_no_requirement_pins_the_user_stack():
    for requirement in read_requirements_txt() + read_requirements_file(REQUIREMENTS_CLI)[1]:
        assert canonicalize_name(requirement.name) not in ("torch", "torchvision", "torchaudio"), requirement
        if canonicalize_name(requirement.name) in USER_STACK:
            assert not requirement.specifier, f"{requirement}: leave numpy/Pillow to ComfyUI"


def _dependency_closure(roots) -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from ``roots`` through their (marker-filtered) requirements."""
    environment = default_environment()
    found: dict[str, metadata.Distribution] = {}
    todo = [(name, frozenset()) for name in roots]
    done = set()
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # pip will resolve it from the index like any missing dependency
        found[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = extras or frozenset([""])
            if requirement.marker and not any(requirement.marker.evaluate({**environment, "extra": e}) for e in wanted):
                continue
            todo.append((requirement.name, frozenset(requirement.extras)))
    return found


def _user_like_venv(root: Path) -> Path:
    """A venv whose only packages are this environment's torch stack (and what it depends on).

    ``python -m venv --system-site-packages`` would expose the *base* interpreter's site-packages, not this
    venv's, so the layering is done with a ``.pth`` file pointing at a folder of symlinks to the stack's
    ``.dist-info`` folders: pip reads installed versions from that metadata, which is all a dry run needs.
    """
    view = root / "user-stack"
    view.mkdir(parents=True)
    for key, dist in _dependency_closure(USER_STACK).items():
        info = Path(getattr(dist, "_path"))  # the .dist-info folder of a path-based distribution
        (view / info.name).symlink_to(info, target_is_directory=True)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "user_stack.pth").write_text(str(view) + "\n", encoding="utf-8")
    return python


@pytest.fixture(scope="module")
def user_like_python(tmp_path_factory) -> Path:
    """Interpreter of a throw-away venv that sees only the torch stack (see _user_like_venv)."""
    for name in USER_STACK:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"the test environment lacks {name}; run scripts/setup_env.sh")
    return _user_like_venv(tmp_path_factory.mktemp("user-like-venv"))


def visible_packages(python: Path) -> set[str]:
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "list", "--format=json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {canonicalize_name(item["name"]) for item in json.loads(result.stdout)}


def plan_install(python: Path, requirements: Path, report_path: Path) -> dict[str, str]:
    """``pip install --dry-run --report`` of a requirements file for ``python``: name -> version pip would install.

    An unreachable package registry is a missing prerequisite: the calling test skips locally, fails under CI.
    """
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-input",
               "--quiet", "--report", str(report_path), "-r", str(requirements)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, PIP_NO_INPUT="1"))
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(marker in output for marker in OFFLINE_MARKERS):
        missing(f"package registry unreachable, cannot resolve {requirements.name}: {output.strip()[-400:]}")
    assert result.returncode == 0, f"pip could not resolve {requirements.name}:\n{output[-4000:]}"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("requirements_file", [REQUIREMENTS, REQUIREMENTS_CLI], ids=lambda path: path.name)
def test_pip_install_requirements_leaves_user_stack_alone(user_like_python, tmp_path, requirements_file):
    visible = visible_packages(user_like_python)
    assert set(USER_STACK) <= visible, f"layered venv does not see the stack: {sorted(visible)}"
    assert "facenet-pytorch" not in visible and "diffusers" not in visible

    planned = plan_install(user_like_python, requirements_file, tmp_path / "report.json")
    touched = {name: planned[name] for name in USER_STACK if name in planned}
    assert not touched, f"pip would install or replace the user's {touched}"
    # The layered venv lacks facenet-pytorch, so the resolution had to choose one: it must be 2.5.x.
    assert Version(planned["facenet-pytorch"]) < Version("2.6"), planned["facenet-pytorch"]
    wanted = read_requirements_txt()
    if requirements_file == REQUIREMENTS_CLI:
        wanted += read_requirements_file(REQUIREMENTS_CLI)[1]
        assert "diffusers" in planned and "transformers" in planned, sorted(planned)
    else:
        assert "diffusers" not in planned, "the nodes' requirements pulled in diffusers"
    for requirement in wanted:
        key = canonicalize_name(requirement.name)
        assert key in planned or key in visible, f"{requirement} neither installed nor planned"


@pytest.mark.slow
def test_dry_run_detects_a_requirement_that_replaces_torch(user_like_python, tmp_path):
    """Control for the test above: facenet-pytorch 2.6.0's pins make pip plan a torch downgrade."""
    bad = tmp_path / "requirements-bad.txt"
    bad.write_text("facenet-pytorch==2.6.0\n", encoding="utf-8")
    planned = plan_install(user_like_python, bad, tmp_path / "report.json")
    assert "torch" in planned and Version(planned["torch"]) < Version("2.3"), planned
