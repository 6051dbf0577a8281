"""What the registry and ComfyUI users see: pyproject's [tool.comfy] metadata in the form comfy-cli accepts,
one repository URL in pyproject and README, README's checkpoint name = the workflows', and the archive that
`comfy node publish` builds (git-tracked files minus .comfyignore) holding what ComfyUI needs and nothing of
the development tree. Offline and quick. comfy-cli is not a test requirement: the last test runs
`comfy node validate` with the comfy-cli that scripts/setup_env.sh installs in .cache/comfy-cli ($DP_COMFY_CLI,
set by scripts/test.sh; required under CI)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet

from tests.support.prerequisites import missing, require_module

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
# the two ComfyUI versions scripts/test.sh runs the node tests on
CI_COMFYUI_VERSIONS = ("0.3.75", "0.33.0")
# comfy-cli 1.23 registry/config_parser.py: what `comfy node validate` accepts (it warns and drops the field
# otherwise, so a typo would publish no OS/accelerator/version information at all)
REGISTRY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
REGISTRY_OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = require_module("tomli", "Python 3.10 reads pyproject.toml through it; pip install tomli")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def repository() -> str:
    return pyproject()["project"]["urls"]["Repository"]


# ------------------------------------------------------------------------------------------- metadata
def test_requires_comfyui_is_registry_syntax_and_covers_the_ci_versions():
    spec_text = pyproject()["tool"]["comfy"]["requires-comfyui"]
    for part in spec_text.split(","):
        assert REGISTRY_VERSION_PART.match(part.strip()), f"the registry would drop requires-comfyui: {part!r}"
    spec = SpecifierSet(spec_text)
    for version in CI_COMFYUI_VERSIONS:
        assert spec.contains(version), f"{spec_text} excludes ComfyUI {version}, which CI tests"
    assert not spec.contains("0.3.74") and not spec.contains("0.34.0"), f"{spec_text} claims untested versions"
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import comfyui_env
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    for variable in ("DP_COMFYUI_DIR", "DP_COMFYUI033_DIR"):  # the trees this run actually tests, if set
        tree = os.environ.get(variable)
        if tree and comfyui_env.is_comfyui_tree(tree):
            assert spec.contains(comfyui_env.read_comfyui_version(tree)), f"{variable}={tree} is outside {spec_text}"


def test_classifiers_are_the_registry_spelling():
    classifiers = pyproject()["project"]["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems == ["OS Independent"]
    assert all(s.startswith(REGISTRY_OS_PREFIXES) for s in systems)
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS, accelerators
    python = {c.rsplit(" :: ", 1)[-1] for c in classifiers if c.startswith("Programming Language :: Python :: 3.")}
    floor = pyproject()["project"]["requires-python"]
    assert python and all(SpecifierSet(floor).contains(v + ".0") for v in python), (python, floor)


def test_icon_is_a_file_of_this_repository():
    icon = pyproject()["tool"]["comfy"]["Icon"]
    owner_name = repository().removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert icon.startswith(prefix), icon
    path = REPO_ROOT / icon.removeprefix(prefix)
    assert path.is_file() and path.suffix in (".svg", ".png", ".jpg"), path


def test_one_repository_url_in_pyproject_and_readme():
    base = repository()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", base), base
    assert "<this repository>" not in README
    assert f"git clone {base}\n" in README
    owner = base.split("/")[3]
    for url in re.findall(rf"https://(?:raw\.githubusercontent|github)\.com/{re.escape(owner)}/[^\s)`\"'>]*", README):
        assert url.startswith((base, base.replace("github.com", "raw.githubusercontent.com"))), url
    for name, url in pyproject()["project"]["urls"].items():
        assert url.startswith(base), f"[project.urls] {name} = {url} is not under {base}"
    assert f"comfy node install {pyproject()['project']['name']}" in README


def _workflow_checkpoints() -> set[str]:
    names = set()
    for path in sorted((REPO_ROOT / "workflows").rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if "nodes" in data:  # UI format: the widget value
            names |= {n["widgets_values"][0] for n in data["nodes"] if n["type"] == "CheckpointLoaderSimple"}
        else:  # API format
            names |= {n["inputs"]["ckpt_name"] for n in data.values() if n["class_type"] == "CheckpointLoaderSimple"}
    return names


def test_readme_names_the_checkpoint_the_workflows_ask_for():
    names = _workflow_checkpoints()
    assert len(names) == 1, f"the workflows disagree on the checkpoint: {names}"
    (name,) = names
    install = README[README.index("## Install (ComfyUI users)"):README.index("## The workflows")]
    row = next(line for line in install.splitlines() if "`models/checkpoints/`" in line)
    assert f"`{name}`" in row, f"README's checkpoint row does not name {name}: {row}"


def test_readme_states_the_supported_range():
    spec = pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert f'`requires-comfyui = "{spec}"`' in README
    assert "models/diff_privacy_keys/" in README


# ------------------------------------------------------------------------------------------- archive
#: what ComfyUI (and the documented CLI) need from the archive
MUST_SHIP = ("__init__.py", "pyproject.toml", "requirements.txt", "requirements-cli.txt", "README.md", "LICENSE",
             "scripts/diffprivacy.py")
MUST_SHIP_TREES = ("nodes/", "core/", "workflows/")
#: never in the archive: the development tree, and what may lie around untracked outside a git checkout
MUST_NOT_SHIP = (".ci/run", "tests/conftest.py", "scripts/test.sh", "scripts/setup_env.sh", "scripts/gpu_check.sh",
                 "scripts/gpu_bench.sh", "scripts/benchmark.py",
                 "scripts/make_tiny_sd15.py", "docs/anonymize.png", ".cache/test-models/x.safetensors",
                 ".venv/bin/python", "models/checkpoints/v1-5.safetensors", "face.dpkey",
                 "output/diff_privacy_keys/a.dpkey", "nodes/__pycache__/x.cpython-311.pyc", ".whl/torch.whl")


def _git() -> str:
    git = shutil.which("git")
    if git is None:
        missing("git is not installed")
    return git


def tracked_files() -> list[str]:
    result = subprocess.run([_git(), "-C", str(REPO_ROOT), "ls-files", "--cached"], capture_output=True, text=True)
    if result.returncode != 0:
        missing(f"not a git checkout: {result.stderr.strip()}")
    return [line for line in result.stdout.splitlines() if line]


def left_out(paths, tmp_path) -> set[str]:
    """The paths .comfyignore leaves out, by git's own gitignore matching (comfy-cli uses pathspec's
    'gitwildmatch', its emulation) in an empty repository with no other ignore source."""
    git = _git()
    (tmp_path / "probe").mkdir()
    subprocess.run([git, "init", "-q", str(tmp_path / "probe")], check=True)
    shutil.copyfile(REPO_ROOT / ".comfyignore", tmp_path / "probe" / ".gitignore")
    result = subprocess.run([git, "-c", "core.excludesFile=/dev/null", "check-ignore", "--no-index", "--stdin"],
                            input="\n".join(paths) + "\n", capture_output=True, text=True, cwd=tmp_path / "probe")
    assert result.returncode in (0, 1), result.stderr
    return set(result.stdout.splitlines())


def test_archive_holds_what_comfyui_needs(tmp_path):
    tracked = tracked_files()
    shipped = set(tracked) - left_out(tracked, tmp_path)
    for name in MUST_SHIP:
        assert name in shipped, f"{name} would be missing from the published archive"
    for tree in MUST_SHIP_TREES:
        inside = [p for p in tracked if p.startswith(tree)]
        assert inside and set(inside) <= shipped, f"{tree}: {sorted(set(inside) - shipped)} left out"
    docs = [p for p in tracked if p.startswith("docs/") and p.endswith(".md")]
    assert docs and set(docs) <= shipped
    shipped_scripts = {p for p in shipped if p.startswith("scripts/")}
    assert shipped_scripts == {"scripts/diffprivacy.py"}, shipped_scripts
    assert not any(p.startswith(("tests/", ".ci/")) for p in shipped)


def test_archive_leaves_out_development_files_caches_weights_and_keys(tmp_path):
    out = left_out(MUST_NOT_SHIP, tmp_path)
    assert out == set(MUST_NOT_SHIP), f"would ship: {sorted(set(MUST_NOT_SHIP) - out)}"


def test_comfy_node_validate_passes_without_warnings():
    comfy = os.environ.get("DP_COMFY_CLI") or shutil.which("comfy")
    if not comfy or not shutil.which(comfy):
        message = f"no comfy-cli at {comfy!r}: scripts/setup_env.sh installs it in .cache/comfy-cli (DP_COMFY_CLI)"
        missing(message)
    env = dict(os.environ, COMFY_NO_UPDATE_CHECK="1", DO_NOT_TRACK="1")
    result = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output
