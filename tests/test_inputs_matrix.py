"""The bad-input matrix (tests/support/input_matrix.py) through the CLI, and README.md's "Supported inputs" table
checked against it. The nodes and server paths of the same rows are in tests/nodes/test_inputs_matrix.py.

The CLI path calls the CLI's own stage functions (scripts/diffprivacy.py, loaded as a module) in the order ``main``
runs them, stopping at the stage that decides the row: ``load_photo`` (decode, orientation, size policy) and, for
rows where the picture decides, the face detector and alignment the pipeline runs first; ``check_checkpoint``
(damage, family and parts from the header); ``open_keys`` (every key-file check, before any model). A few rows also
run the CLI for real in a subprocess to show exit status 2, one line and no traceback.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import input_matrix as im
from tests.support import model_families as mf
from tests.support import photos

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_PATH = REPO_ROOT / "scripts" / "diffprivacy.py"
README = REPO_ROOT / "README.md"


@pytest.fixture(scope="module")
def cli():
    """scripts/diffprivacy.py as a module, with its runtime imported (what ``main`` does before the stages)."""
    spec = importlib.util.spec_from_file_location("diffprivacy_cli_matrix", CLI_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_requirements()
    module.load_runtime()
    return module


def outcome_of(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def assert_outcome(row: im.Row, path: str, got: tuple[str | None, str]) -> None:
    expected = row.outcome(path)
    error, message = got
    assert im.matches(expected, error, message), \
        f"{row.id} via {path}: expected {expected.label()} with {expected.words}, got {error}: {message[:600]}"


_DETECTIONS: dict[str, tuple[str | None, str]] = {}


def detect_once(photo: torch.Tensor) -> tuple[str | None, str]:
    """The pipeline's first steps on a decoded photo — every face found and planned (core.pipeline.select_faces,
    the default selection: all faces, no fallback), each one to protect aligned — once per distinct picture."""
    from core import faces
    from core.pipeline import select_faces

    key = hashlib.sha256(photo.numpy().tobytes()).hexdigest() + str(tuple(photo.shape))
    if key not in _DETECTIONS:
        try:
            for face in select_faces(None, photo).with_action("protect"):
                faces.align_face(photo, face.detection, size=64)
            _DETECTIONS[key] = (None, "")
        except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
            _DETECTIONS[key] = outcome_of(exc)
    return _DETECTIONS[key]


def as_uint8(photo: torch.Tensor) -> np.ndarray:
    return (photo.numpy() * 255.0).round().astype(np.uint8)


def assert_pixels(row: im.Row, decoded: np.ndarray, reference: np.ndarray) -> None:
    assert decoded.shape == reference.shape, (row.id, decoded.shape, reference.shape)
    error = np.abs(decoded.astype(np.int16) - reference.astype(np.int16))
    if row.tolerance == 0:
        assert error.max() == 0, f"{row.id}: decoded pixels differ from the upright reference (max {error.max()})"
    else:
        assert error.mean() <= row.tolerance, f"{row.id}: mean error {error.mean():.2f} > {row.tolerance}"


# --------------------------------------------------------------------------------------------- photos
@pytest.mark.parametrize("row", im.rows("photo", "cli"), ids=lambda row: row.id)
def test_photo_rows_through_the_cli(cli, tmp_path, row):
    path = row.make(tmp_path)
    try:
        photo = cli.load_photo(str(path))
    except Exception as exc:  # noqa: BLE001
        assert_outcome(row, "cli", outcome_of(exc))
        return
    assert photo.dtype == torch.float32 and photo.shape[-1] == 3 and 0 <= float(photo.min()) <= float(photo.max()) <= 1
    if row.reference is not None:
        assert_pixels(row, as_uint8(photo), row.reference())
    assert_outcome(row, "cli", detect_once(photo) if row.detect else (None, ""))


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("row", im.rows("checkpoint", "cli"), ids=lambda row: row.id)
def test_checkpoint_rows_through_the_cli(cli, tmp_path, row):
    path = row.make(tmp_path)
    try:
        cli.check_checkpoint(str(path))
        got = (None, "")
    except Exception as exc:  # noqa: BLE001
        got = outcome_of(exc)
    assert_outcome(row, "cli", got)
    if got[0] is not None:
        assert f"'{path}'" in got[1], "the message names the file"
    if row.id == "code-in-ckpt":
        assert not (tmp_path / "PAYLOAD-RAN").exists()
    if row.group == "legacy-ckpt":  # the full reader gives the weights themselves, not only their shapes
        from core.weights import read_state_dict

        sd = read_state_dict(path, what="SD1.x checkpoint")
        assert sorted(sd) == sorted(mf.sd1()) and all(not v.any() for v in sd.values())


# ------------------------------------------------------------------------------------------- key files
@pytest.mark.parametrize("row", im.rows("keyfile", "cli"), ids=lambda row: row.id)
def test_key_file_rows_through_the_cli(cli, tmp_path, row):
    path = row.make(tmp_path)
    secret = row.extra.get("passphrase", im.KEY_PASSPHRASE)
    try:
        keys = cli.open_keys(str(path), secret, f"${cli.PASSPHRASE_ENV}")
        got = (None, "")
        assert len(keys.faces) == 1 and keys.faces[0].z_T.shape == (1, 4, 8, 8)
    except Exception as exc:  # noqa: BLE001
        got = outcome_of(exc)
    assert_outcome(row, "cli", got)


# --------------------------------------------------------------------------------- the CLI for real
def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI_PATH), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-files")
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tokenizer / name).write_text("{}")  # the stages tested here stop before the tokenizer is read
    (folder / "facenet.pt").write_bytes(b"unread")
    return {"folder": folder, "tokenizer": str(tokenizer), "recognizer": str(folder / "facenet.pt"),
            "photo": str(photos_file(folder)), "sd15": str(mf.write_checkpoint(folder / "sd15.safetensors", mf.sd1()))}


def photos_file(folder: Path) -> Path:
    path = folder / "astronaut.png"
    path.write_bytes(photos.encode(im.ref256(), "PNG"))
    return path


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("row", im.rows("argument"), ids=lambda row: row.id)
def test_argument_rows_exit_2_before_any_model(cli_files, tmp_path, row):
    missing = str(row.make(tmp_path))
    protect = ["protect", "--checkpoint", cli_files["sd15"], "--tokenizer-dir", cli_files["tokenizer"],
               "--keys", str(tmp_path / "new.dpkey"), "--recognizer", cli_files["recognizer"],
               "--photo", cli_files["photo"], "--out", str(tmp_path / "out")]
    recover = ["recover", "--checkpoint", cli_files["sd15"], "--tokenizer-dir", cli_files["tokenizer"],
               "--keys", str(im._key_file(tmp_path, "k.dpkey")), "--out", str(tmp_path / "r.png")]
    flag = {"missing-photo": "--photo", "missing-checkpoint": "--checkpoint", "missing-key-file": "--keys",
            "missing-output-folder": "--out"}[row.id]
    argv = recover if row.id in ("missing-key-file", "missing-output-folder") else protect
    argv[argv.index(flag) + 1] = missing
    line = _one_error_line(_run(argv))
    for word in row.expect.words:
        assert word in line


def test_decided_rows_exit_2_with_one_line_before_any_model(cli_files, tmp_path):
    """One photo, one checkpoint and one key-file row through the real CLI: each stops with the row's message, as
    one line with exit status 2, before a model is built (the tokenizer files are placeholders: reading them, the
    first step of building the models, would fail differently)."""
    tiny = next(row for row in im.ROWS if row.id == "size-16px")
    sdxl = next(row for row in im.ROWS if row.id == "sdxl")
    salt = next(row for row in im.ROWS if row.id == "key-header-salt-changed")
    common = ["--tokenizer-dir", cli_files["tokenizer"]]
    env = {"DIFF_PRIVACY_PASSPHRASE": im.KEY_PASSPHRASE}
    protect = ["protect", *common, "--recognizer", cli_files["recognizer"], "--out", str(tmp_path / "out")]
    line = _one_error_line(_run([*protect, "--checkpoint", cli_files["sd15"], "--keys", str(tmp_path / "a.dpkey"),
                                 "--photo", str(tiny.make(tmp_path))], env))
    assert all(word in line for word in tiny.expect.words)
    line = _one_error_line(_run([*protect, "--checkpoint", str(sdxl.make(tmp_path)), "--keys",
                                 str(tmp_path / "b.dpkey"), "--photo", cli_files["photo"]], env))
    assert line.startswith("error: --checkpoint '") and all(word in line for word in sdxl.expect.words)
    line = _one_error_line(_run(["recover", *common, "--checkpoint", cli_files["sd15"], "--keys",
                                 str(salt.make(tmp_path)), "--out", str(tmp_path / "r.png")], env))
    assert all(word in line for word in salt.expect.words)
    assert not (tmp_path / "a.dpkey").exists() and not (tmp_path / "b.dpkey").exists()


# ------------------------------------------------------------------------------------ the matrix itself
def test_rows_are_unique_and_explained():
    ids = [row.id for row in im.ROWS]
    assert len(ids) == len(set(ids))
    for row in im.ROWS:
        if row.nodes is not None and row.nodes.error != row.expect.error:
            assert row.why, row.id
    assert len(im.rows(server=True)) >= 5
    kinds = {row.kind for row in im.ROWS}
    assert kinds == {"photo", "checkpoint", "keyfile", "argument"}
    assert {f"exif-orientation-{t}" for t in range(1, 9)} <= set(ids)


# ------------------------------------------------------------------------------------------ README
SECTION = "## Supported inputs"
CELL = re.compile(r"^(works|refused \(`[A-Za-z0-9_ ]+`\))")


def readme_table() -> dict[str, dict[str, str]]:
    """``{group: {"cli": label, "nodes": label}}`` from README.md's Supported inputs table. The last column names the
    matrix group in backticks; a cell starts with "works" or "refused (`Class`)" (free text may follow), or is "—"
    when that path does not take the input."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header and rule
    table = {}
    for line in rows:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        _, cli_cell, nodes_cell, group_cell = cells
        group = group_cell.strip("`")
        entry = {}
        for path, cell in (("cli", cli_cell), ("nodes", nodes_cell)):
            if cell in ("—", "-"):
                continue
            match = CELL.match(cell)
            assert match, f"README cell {cell!r} (group {group}) must start with 'works' or 'refused (`Class`)'"
            entry[path] = match.group(1)
        assert group not in table, f"group {group} twice in the README table"
        table[group] = entry
    return table


def test_readme_supported_inputs_match_the_matrix():
    table = readme_table()
    matrix = im.group_outcomes()
    assert set(table) == set(matrix), (f"README lacks {sorted(set(matrix) - set(table))}, "
                                       f"has extra {sorted(set(table) - set(matrix))}")
    for group, paths in matrix.items():
        for path, labels in paths.items():
            assert len(labels) == 1, f"group {group} mixes outcomes on {path}: {labels}; split the group"
            assert table[group].get(path) == next(iter(labels)), (group, path, table[group], labels)
        assert set(table[group]) == set(paths), (group, table[group], paths)
