"""The ComfyUI boundary, checked on the source files (no ComfyUI needed).

* ``nodes/comfy/`` (the bridge) is the only place in ``nodes/`` that imports ComfyUI's internals (``comfy``,
  ``comfy_execution``, ``comfy_extras``, ``folder_paths``, ``latent_preview``, ``server``, ``execution``,
  ComfyUI's ``nodes``) or reaches into a MODEL's ``BaseModel`` (``model.model.…``, ``process_latent_*``);
  ``comfy_api`` (the public V3 node API) is allowed in node modules.
* ``core/`` imports nothing of ComfyUI (``comfy_api`` included) and nothing of the pack's ``nodes``.
* The issue's acceptance command finds nothing:
  ``grep -rln "import comfy\\|folder_paths\\|model\\.model\\." nodes/ | grep -v nodes/comfy/``.

Each check is one function, also run on planted violations, so a broken check cannot pass silently.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES_DIR = REPO_ROOT / "nodes"
BRIDGE_DIR = NODES_DIR / "comfy"
CORE_DIR = REPO_ROOT / "core"

#: top-level modules of ComfyUI's own tree that only the bridge may import
COMFYUI_INTERNALS = frozenset({"comfy", "comfy_execution", "comfy_extras", "folder_paths", "latent_preview",
                               "server", "execution", "nodes"})
#: what core/ may not import at all: ComfyUI, its public API included
COMFYUI_ANY = COMFYUI_INTERNALS | {"comfy_api"}
#: the issue's acceptance grep, as a regular expression over the file text
ACCEPTANCE_PATTERN = re.compile(r"import comfy|folder_paths|model\.model\.")
#: BaseModel internals a node module must reach through the bridge
BASE_MODEL_ATTRIBUTES = frozenset({"process_latent_in", "process_latent_out"})


def python_files(root: Path, exclude: Path | None = None) -> list[Path]:
    """The .py files under ``root`` (no caches), minus those under ``exclude``."""
    files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(p for p in files if exclude is None or exclude not in p.parents)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(line, dotted module name, relative level) of every import, and of ``importlib.import_module("…")`` /
    ``__import__("…")`` calls with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.lineno, node.module, node.level))
            else:  # "from . import x" / "from .. import nodes"
                found += [(node.lineno, alias.name, node.level) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value, 0))
    return found


def import_violations(path: Path, forbidden: frozenset[str], *, forbid_pack_nodes: bool = False) -> list[str]:
    """"path:line: imports X" for each absolute import of a module in ``forbidden`` (by top-level name) and,
    with ``forbid_pack_nodes``, each relative import that reaches the pack's ``nodes`` package from ``core``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for line, module, level in _imported_modules(tree):
        top = module.split(".")[0]
        if level == 0 and top in forbidden:
            out.append(f"{path}:{line}: imports {module}")
        elif level >= 2 and forbid_pack_nodes and top == "nodes":
            out.append(f"{path}:{line}: imports the pack's {'.' * level}{module}")
    return out


def base_model_violations(path: Path) -> list[str]:
    """"path:line: …" for each access to a MODEL's BaseModel outside the bridge: a source line containing
    ``model.model.``, an attribute chain ``….model.model`` / ``model.model``, or ``process_latent_in/out``."""
    text = path.read_text(encoding="utf-8")
    out = [f"{path}:{i}: line contains 'model.model.'" for i, line in enumerate(text.splitlines(), 1)
           if "model.model." in line]
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        inner = node.value
        chained = node.attr == "model" and (
            (isinstance(inner, ast.Attribute) and inner.attr == "model")
            or (isinstance(inner, ast.Name) and inner.id == "model"))
        if chained or node.attr in BASE_MODEL_ATTRIBUTES:
            out.append(f"{path}:{node.lineno}: accesses .{node.attr} of a MODEL's BaseModel")
    return out


def acceptance_grep_hits(path: Path) -> list[str]:
    """"path: …" when the file's text matches the issue's acceptance grep."""
    match = ACCEPTANCE_PATTERN.search(path.read_text(encoding="utf-8"))
    return [f"{path}: matches {match.group(0)!r}"] if match else []


def node_module_violations(path: Path) -> list[str]:
    """Every boundary rule for a module of ``nodes/`` outside the bridge."""
    return import_violations(path, COMFYUI_INTERNALS) + base_model_violations(path) + acceptance_grep_hits(path)


def core_module_violations(path: Path) -> list[str]:
    """Every boundary rule for a module of ``core/``."""
    return import_violations(path, COMFYUI_ANY, forbid_pack_nodes=True)


# --------------------------------------------------------------------------------------------- the tree
def test_the_bridge_package_exists_and_the_old_module_is_gone():
    assert (BRIDGE_DIR / "__init__.py").is_file()
    assert not (NODES_DIR / "bridge.py").exists()


def test_node_modules_reach_comfyui_only_through_the_bridge():
    files = python_files(NODES_DIR, exclude=BRIDGE_DIR)
    assert len(files) >= 9, files  # the scan sees the node modules
    violations = [v for path in files for v in node_module_violations(path)]
    assert violations == []


def test_core_imports_nothing_of_comfyui_or_nodes():
    files = python_files(CORE_DIR)
    assert len(files) >= 10, files
    violations = [v for path in files for v in core_module_violations(path)]
    assert violations == []


def test_the_bridge_is_where_comfyui_is_imported():
    """The scan is not vacuous: the bridge itself trips the node-module rules."""
    assert [v for path in python_files(BRIDGE_DIR) for v in import_violations(path, COMFYUI_INTERNALS)]


# ------------------------------------------------------------------------------- planted violations
NODE_VIOLATIONS = [
    "import comfy.samplers",
    "from comfy.samplers import KSAMPLER",
    "import folder_paths",
    "from comfy_execution.utils import get_executing_context",
    "import latent_preview as lp",
    "from server import PromptServer",
    "import nodes",
    "import importlib\nmm = importlib.import_module('comfy.model_management')",
    "def f(model, z):\n    return model.model.process_latent_in(z)",
    "def f(patcher):\n    base = patcher.model.model\n    return base",
    "def f(base, z):\n    return base.process_latent_out(z)",
    "text = 'folder_paths'",
]
NODE_CLEAN = [
    "from comfy_api.latest import io, ui",
    "from . import convert\nfrom .comfy.models import to_comfy_latent",
    "from ..core import sampling",
    "def f(clip_vision):\n    return clip_vision.model",
]


@pytest.mark.parametrize("source", NODE_VIOLATIONS)
def test_a_planted_violation_in_a_node_module_is_caught(tmp_path, source):
    path = tmp_path / "planted.py"
    path.write_text(source + "\n", encoding="utf-8")
    assert node_module_violations(path)


@pytest.mark.parametrize("source", NODE_CLEAN)
def test_allowed_node_module_imports_pass(tmp_path, source):
    path = tmp_path / "clean.py"
    path.write_text(source + "\n", encoding="utf-8")
    assert node_module_violations(path) == []


@pytest.mark.parametrize("source", ["from comfy_api.latest import io", "import comfy.utils",
                                    "from ..nodes.comfy import models", "from .. import nodes",
                                    "import folder_paths"])
def test_a_planted_violation_in_core_is_caught(tmp_path, source):
    path = tmp_path / "planted.py"
    path.write_text(source + "\n", encoding="utf-8")
    assert core_module_violations(path)


def test_core_relative_imports_of_itself_pass(tmp_path):
    path = tmp_path / "clean.py"
    path.write_text("from .diffusion import sigma_at\nfrom . import faces\nimport torch\n", encoding="utf-8")
    assert core_module_violations(path) == []
