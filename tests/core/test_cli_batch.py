"""The CLI on folders: every photo (and every face in it) protected, a bad file listed without stopping the
others, a non-zero exit, stable names linking each key file to its photo, resume without redoing finished photos,
and whole-photo recovery from a protected photo and its key file."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core import keyfile
from tests.support.group_photo import astronaut, group_photo

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "a long test passphrase"
TINY = ["--size", "64", "--msi-steps", "2", "--inversion-steps", "4", "--steps", "8", "--strength", "0.5",
        "--batch-size", "1", "--max-identity-similarity", "1.0", "--quiet"]


def _cli():
    spec = importlib.util.spec_from_file_location("diffprivacy_cli_batch", REPO / "scripts" / "diffprivacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(path: Path, pixels: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels.numpy() * 255 + 0.5).astype(np.uint8)).save(path)


def test_folder_batch_resume_failures_and_recovery(pipeline_files, tmp_path, monkeypatch, capsys):
    cli = _cli()
    monkeypatch.setenv("DIFF_PRIVACY_PASSPHRASE", PASSPHRASE)
    photos = tmp_path / "photos"
    _save(photos / "group.png", group_photo())
    _save(photos / "trip" / "portrait.png", astronaut())
    (photos / "trip" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out, keys = tmp_path / "out", tmp_path / "keys"
    common = ["--checkpoint", pipeline_files["checkpoint"], "--tokenizer-dir", pipeline_files["tokenizer"]]
    argv = ["protect", *common, "--recognizer", pipeline_files["facenet"], "--photo", str(photos), "--recursive",
            "--out", str(out), "--keys", str(keys), *TINY]
    assert cli.main(argv) == 1  # one photo failed, the others were protected
    err = capsys.readouterr().err
    assert "protected 2 photo(s), 0 already done, 1 failed" in err and "broken.jpg" in err
    # stable names: the key file mirrors the photo's place and name
    assert (out / "group_anonymize_00.png").is_file() and (out / "trip" / "portrait_anonymize_00.png").is_file()
    assert (keys / "group_anonymize.dpkey").is_file() and (keys / "trip" / "portrait_anonymize.dpkey").is_file()
    report = json.loads((out / "group_anonymize.report.json").read_text())
    assert report["passed"] and [f["action"] for f in report["faces"]] == ["protected"] * 3
    group_keys = keyfile.load_photo_keys(keys / "group_anonymize.dpkey", PASSPHRASE)
    assert len(group_keys.faces) == 3 and group_keys.photo_size == (480, 720)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # run again: finished photos are skipped (nothing rewritten), the broken one fails again
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "2 photo(s) already protected" in err and "protected 0 photo(s), 2 already done, 1 failed" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    # the whole group photo back from the protected photo and its key file
    restored = tmp_path / "restored.png"
    assert cli.main(["recover", *common, "--keys", str(keys / "group_anonymize.dpkey"), "--photo",
                     str(out / "group_anonymize_00.png"), "--out", str(restored)]) == 0
    with Image.open(restored) as image, Image.open(out / "group_anonymize_00.png") as protected:
        restored_px, protected_px = np.asarray(image.convert("RGB")), np.asarray(protected.convert("RGB"))
    assert restored_px.shape == (480, 720, 3)
    changed = np.any(restored_px != protected_px, axis=-1)
    assert 0 < changed.mean() < 0.3  # only the face regions were replaced
    # the largest face only: the others are left alone and the report says why
    only = tmp_path / "largest"
    assert cli.main(["protect", *common, "--recognizer", pipeline_files["facenet"], "--photo",
                     str(photos / "group.png"), "--out", str(only), "--keys", str(tmp_path / "largest.dpkey"),
                     "--faces", "largest", *TINY]) == 0
    faces = json.loads((only / "group_anonymize.report.json").read_text())["faces"]
    assert [f["action"] for f in faces] == ["protected", "left alone", "left alone"]
