"""The building-block graph on several faces, in ComfyUI's own executor: Face Align → MSI Invert → Embedding
Scheduler → Identity Energy Guidance → Privacy Sampler → Face Paste Back → Save Protected Image / Save Privacy
Keys, on the generated group photo (three faces: a main face, a bystander at a fifth of its area, one cut by the
border; tests/support/group_photo.py) and on IMAGE batches of two photos.

What is checked: every face changes and every pixel outside the faces is the input's; every face is gated on its
own samples; N×B results; one key file per photo holding every face and its geometry, from which Recover Photo
restores the photo and Recover Original the N aligned crops; ComfyUI's conditioning tiling (cond k % N) matches
the sample-major order the sampler uses; several faces in one run give exactly what each face gives alone (MSI
Invert, and the whole sampler with its conditioning, guidance and background paste), so faces are kept apart.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from .helpers import (PASSPHRASE_ENV, TEST_PASSPHRASE, assert_every_face_changed_and_nothing_else, face_masks, load_api,
                      node_ids, saved_images, set_inputs, tiny)

pytestmark = pytest.mark.comfyui

SIZE = 64
BATCH = 2
SAMPLER_STEPS = 4  # strength 0.6 → 2 denoising steps


# ------------------------------------------------------------------------------------------------ helpers
def _module(comfy, name: str):
    """The pack's module ``nodes.<name>`` as ComfyUI imported it."""
    package = comfy.node_classes["DiffPrivacy_PrivacySampler"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def _run(node_class, **inputs):
    """One node's ``execute`` as ComfyUI's executor calls it; returns its outputs as a tuple."""
    with torch.inference_mode():
        return node_class.execute(**inputs).args


def _png(folder, name: str, pixels: torch.Tensor) -> str:
    Image.fromarray((pixels.numpy() * 255 + 0.5).astype(np.uint8)).save(os.path.join(folder, name))
    return name


def _read(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)




@pytest.fixture(scope="module")
def group(comfy_inprocess):
    """The group photo as the PNG LoadImage reads, and as the tensor it gives (uint8-rounded)."""
    from tests.support.group_photo import group_photo

    name = _png(comfy_inprocess.input_dir, "mf_group.png", group_photo())
    return name, _read(comfy_inprocess.input_dir / name)


@pytest.fixture(scope="module")
def models(comfy_inprocess):
    import comfy.sd

    from core.recognizers import load_recognizer

    tree = comfy_inprocess.models
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tree.checkpoints / tree.checkpoint_name),
                                                                 output_vae=True, output_clip=True)[:3]
    recognizer = load_recognizer(str(tree.face_recognition / tree.facenet_name), "auto").eval()
    return model, clip, vae, recognizer


# --------------------------------------------------------------------------------- the anonymize graph
@pytest.fixture(scope="module")
def anonymize_run(comfy_inprocess, group):
    name, _ = group
    os.environ.setdefault(PASSPHRASE_ENV, TEST_PASSPHRASE)
    graph = tiny(load_api("anonymize"), photo=name, ckpt=comfy_inprocess.models.checkpoint_name,
                 sampler_steps=SAMPLER_STEPS, batch_size=BATCH, prefix="mf_anonymize")
    set_inputs(graph, "DiffPrivacy_IdentityEnergyGuidance", max_identity_similarity=1.0)
    set_inputs(graph, "DiffPrivacy_SaveKeys", filename_prefix="mf_anonymize")
    before = set(os.listdir(comfy_inprocess.models.keys))
    history = comfy_inprocess.run(graph)
    keys = sorted(set(os.listdir(comfy_inprocess.models.keys)) - before)
    return graph, history, keys


def test_every_face_changed_everything_else_identical(comfy_inprocess, group, anonymize_run):
    graph, history, _ = anonymize_run
    _, photo = group
    records = saved_images(history, graph)
    images = [_read(comfy_inprocess.output_path(r)) for r in records]
    assert len(images) == BATCH and all(i.shape == photo.shape for i in images)  # B photos for the one photo
    _, union = assert_every_face_changed_and_nothing_else(images, photo, 3)
    assert not torch.equal(images[0][union > 0], images[1][union > 0])  # two different samples
    # Face Align's preview: the photo with the three faces boxed and numbered
    (preview,) = node_ids(graph, "PreviewImage")
    (record,) = history["outputs"][preview]["images"]
    assert (_read(comfy_inprocess.output_path(record)) - photo).abs().amax() > 0.3


def test_every_face_is_gated_on_its_own_samples(comfy_inprocess, anonymize_run):
    """One report for the run: three faces, each with B guiding scores of its own samples (the gate passed every
    one), outside-the-face metrics for every one of the N×B crops."""
    graph, history, _ = anonymize_run
    path = comfy_inprocess.output_path(saved_images(history, graph)[0])
    report = json.loads(path.with_name(path.stem + ".report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["settings"]["faces"] == 3
    assert [f["index"] for f in report["faces"]] == [0, 1, 2]
    for face in report["faces"]:
        assert [s["sample"] for s in face["scores"]] == list(range(BATCH)) and all(s["passed"] for s in face["scores"])
        assert len(face["face_detected"]) == BATCH
    cosines = [[s["cosine"] for s in f["scores"]] for f in report["faces"]]
    assert len({tuple(c) for c in cosines}) == 3  # each face scored against its own source
    assert len(report["outside_faces"]) == 3 * BATCH


def test_one_key_file_per_photo_and_whole_photo_recovery(comfy_inprocess, group, anonymize_run):
    """Save Privacy Keys writes one file for the photo with the three faces and where they sit; recover.json gives
    back the photo (Recover Photo: outside the faces identical, each face the recovered crop) and the three
    aligned crops (Recover Original on the N-face key-E Load Privacy Keys outputs), which agree."""
    from core import faces
    from core.keyfile import load_photo_keys

    graph, history, keys = anonymize_run
    _, photo = group
    assert len(keys) == 1
    loaded = load_photo_keys(comfy_inprocess.models.keys / keys[0], os.environ[PASSPHRASE_ENV])
    assert len(loaded.faces) == 3 and loaded.placed and loaded.photo_size == (480, 720)
    assert [g.number for g in loaded.geometry] == [1, 2, 3]
    from tests.support.group_photo import EXPECTED_BOXES, box_close

    assert all(box_close(g.box, e) for g, e in zip(loaded.geometry, EXPECTED_BOXES))

    protected = _read(comfy_inprocess.output_path(saved_images(history, graph)[0]))
    name = _png(comfy_inprocess.input_dir, "mf_protected.png", protected)
    recover = tiny(load_api("recover"), photo=name, ckpt=comfy_inprocess.models.checkpoint_name, prefix="mf_recover")
    set_inputs(recover, "DiffPrivacy_LoadKeys", key_file=keys[0])
    out = comfy_inprocess.run(recover)
    records = saved_images(out, recover)
    crops = [_read(comfy_inprocess.output_path(r)) for r in records if r["filename"].startswith("mf_recover")]
    assert len(records) == 4  # three recovered crops (Recover Original) and the photo (Recover Photo)
    (restored,) = [c for c in crops if c.shape == photo.shape]
    crops = [c for c in crops if c.shape == (SIZE, SIZE, 3)]
    assert len(crops) == 3
    _, masks = face_masks(photo)
    union = torch.stack(masks).amax(dim=0)
    assert torch.equal(restored[union == 0], photo[union == 0])
    for crop, geometry, mask in zip(crops, loaded.geometry, masks):
        aligned = faces.AlignedFace(crop=crop, matrix=np.asarray(geometry.matrix), source_size=geometry.photo_size,
                                    size=geometry.crop_size, quad=np.asarray(geometry.quad))
        inside = mask == 1
        # Recover Original's crop pasted where the geometry says is Recover Photo's face (PNG rounding apart)
        expected = faces.paste_back(protected, crop, aligned)
        assert float((restored[inside] - expected[inside]).abs().amax()) <= 2.5 / 255
        assert (restored[inside] - protected[inside]).abs().mean() > 0.01  # the protected face was replaced


# ------------------------------------------------------------------------------------------ Face Align
def test_face_align_takes_every_photo_of_a_batch(comfy_inprocess, group, models):
    """Two different photos in one IMAGE batch (the group photo and its mirror image): the faces of both, photo by
    photo in reading order, and Face Paste Back gives B photos per photo with only the faces changed."""
    from tests.support.group_photo import EXPECTED_BOXES, box_close

    _, photo = group
    batch = torch.stack([photo, photo.flip(1)])
    align = comfy_inprocess.node_classes["DiffPrivacy_FaceAlign"]
    aligned, alignment, mask, preview = _run(align, image=batch, size=SIZE, min_confidence=0.9)
    assert aligned.shape == (6, SIZE, SIZE, 3) and mask.shape == (6, SIZE, SIZE) and preview.shape == (2, 480, 720, 3)
    assert [(f.photo, f.number) for f in alignment.faces] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    width = photo.shape[1]
    mirrored = [(width - x1, y0, width - x0, y1) for x0, y0, x1, y1 in reversed(EXPECTED_BOXES)]
    for face, expected in zip(alignment.faces, list(EXPECTED_BOXES) + mirrored):
        assert box_close(face.box, expected), (face.photo, face.number, face.box, expected)

    crops = torch.rand(6 * BATCH, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    (photos,) = _run(comfy_inprocess.node_classes["DiffPrivacy_FacePasteBack"], faces=crops, alignment=alignment,
                     feather=0.1)
    assert photos.shape == (2 * BATCH, 480, 720, 3)
    from core import faces

    for p in range(2):
        masks = [faces.source_mask(alignment.faces[k].aligned) for k in alignment.faces_of(p)]
        union = torch.stack(masks).amax(dim=0)
        for b in range(BATCH):
            out = photos[p * BATCH + b]
            assert torch.equal(out[union == 0], batch[p][union == 0])
            for mask in masks:
                assert (out[mask == 1] - batch[p][mask == 1]).abs().mean() > 0.05
    with pytest.raises(ValueError, match="samples of every face"):
        _run(comfy_inprocess.node_classes["DiffPrivacy_FacePasteBack"], faces=crops[:5], alignment=alignment,
             feather=0.1)


def test_face_align_selection_widgets(comfy_inprocess, group, models):
    from tests.support.group_photo import EXPECTED_BOXES, box_close

    _, photo = group
    align = comfy_inprocess.node_classes["DiffPrivacy_FaceAlign"]
    aligned, alignment, _, preview = _run(align, image=photo[None], size=SIZE, min_confidence=0.9,
                                          selection="index", face_numbers="1,3", fallback="fail", match_threshold=-1.0)
    assert aligned.shape[0] == 2 and [f.number for f in alignment.faces] == [1, 3]
    assert box_close(alignment.faces[0].box, EXPECTED_BOXES[0]) and box_close(alignment.faces[1].box, EXPECTED_BOXES[2])
    assert [f.action for f in alignment.photos[0].plan.faces] == ["protect", "skip", "protect"]
    aligned, alignment, _, _ = _run(align, image=photo[None], size=SIZE, min_confidence=0.9, selection="largest")
    assert [f.number for f in alignment.faces] == [1]
    with pytest.raises(Exception, match="do not exist"):
        _run(align, image=photo[None], size=SIZE, min_confidence=0.9, selection="index", face_numbers="4")
    with pytest.raises(ValueError, match="recognizer"):
        _run(align, image=photo[None], size=SIZE, min_confidence=0.9, selection="match_reference",
             reference=photo[None])


def test_face_align_fallback_faces_are_obscured_by_face_paste_back(comfy_inprocess):
    """A face cut by the border beyond repair (an eye outside the photo): with fallback 'fail' Face Align stops
    and lists it; with 'blur' it aligns the other two and Face Paste Back blurs that face's region, leaving every
    pixel outside the three faces as it was."""
    from core import faces
    from tests.support.group_photo import group_photo

    photo = group_photo(heads=((1.4, False, 30, 90), (0.63, True, 330, 200), (1.0, False, 610, 100)))
    align = comfy_inprocess.node_classes["DiffPrivacy_FaceAlign"]
    with pytest.raises(Exception, match="face 3 .*cut by the photo border") as error:
        _run(align, image=photo[None], size=SIZE, min_confidence=0.9)
    assert type(error.value).__name__ == "UnprocessableFacesError" and "Face Align" in str(error.value)
    aligned, alignment, _, _ = _run(align, image=photo[None], size=SIZE, min_confidence=0.9, fallback="blur")
    assert [f.number for f in alignment.faces] == [1, 2] and len(alignment.photos[0].fallbacks) == 1
    crops = torch.rand(2 * BATCH, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    (photos,) = _run(comfy_inprocess.node_classes["DiffPrivacy_FacePasteBack"], faces=crops, alignment=alignment,
                     feather=0.1)
    blurred = faces.source_mask(alignment.photos[0].fallbacks[0])
    union = torch.stack([blurred] + [faces.source_mask(f.aligned) for f in alignment.faces]).amax(dim=0)
    for out in photos:
        assert torch.equal(out[union == 0], photo[union == 0])
        assert (out[blurred == 1] - photo[blurred == 1]).abs().mean() > 0.02


# ------------------------------------------------------------------------------- faces are kept apart
def test_comfyui_tiles_a_conditioning_of_n_faces_sample_major(comfy_inprocess):
    """What Privacy Sampler relies on, read in ComfyUI's source (comfy/samplers.py get_area_and_mult calls
    CONDCrossAttn.process_cond(batch_size=x_in.shape[0]) → comfy.utils.repeat_to_batch_size): a conditioning of
    batch N over a latent batch of N·B gives latent row k the cond row k % N."""
    import comfy.conds

    n, b = 3, 2
    cond = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1).expand(n, 77, 8).contiguous()
    tiled = comfy.conds.CONDCrossAttn(cond).process_cond(batch_size=n * b, area=None).cond
    assert [int(row[0, 0]) for row in tiled] == [k % n for k in range(n * b)]


@pytest.fixture(scope="module")
def two_faces(comfy_inprocess, group, models):
    """MSI Invert on two faces of the group photo at once, and on each alone (same seed)."""
    _, photo = group
    model, clip, vae, _ = models
    aligned, _, mask, _ = _run(comfy_inprocess.node_classes["DiffPrivacy_FaceAlign"], image=photo[None], size=SIZE,
                               min_confidence=0.9, selection="index", face_numbers="1,2")
    invert = comfy_inprocess.node_classes["DiffPrivacy_MSIInvert"]
    settings = dict(model=model, clip=clip, vae=vae, mode="lite", steps=2, learning_rate=5e-3, inversion_steps=4,
                    timesteps_per_step=1, seed=23, official_uint8_quirk=False)
    both = _run(invert, image=aligned, **settings)
    alone = [_run(invert, image=aligned[i : i + 1], **settings) for i in range(2)]
    return aligned, mask, both, alone


def test_msi_invert_on_two_faces_equals_two_single_face_runs(two_faces):
    _, _, (embeds, key_latent), alone = two_faces
    assert embeds.num_faces == 2 and embeds.stage_conds.shape[:2] == (2, 10) and key_latent["samples"].shape[0] == 2
    for i, (single, single_latent) in enumerate(alone):
        assert single.num_faces == 1 and single.stage_conds.dim() == 3  # one face keeps the single-face layout
        # the two faces run as one batch: equal to each alone up to the batched kernels' rounding
        torch.testing.assert_close(embeds.stage_conds[i], single.stage_conds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(embeds.stage_tokens[i], single.stage_tokens, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(key_latent["samples"][i : i + 1], single_latent["samples"], atol=1e-5, rtol=1e-4)
    assert (embeds.stage_conds[0] - embeds.stage_conds[1]).abs().amax() > 1e-3  # two different faces


def test_msi_invert_fits_the_faces_that_memory_allows_per_batch(comfy_inprocess, two_faces, models, monkeypatch):
    """With free memory for one face only, MSI Invert fits the two faces one batch each: the same keys."""
    import importlib

    aligned, _, (embeds, key_latent), _ = two_faces
    invert = comfy_inprocess.node_classes["DiffPrivacy_MSIInvert"]
    core_msi = importlib.import_module(invert.__module__).msi
    measured = []
    monkeypatch.setattr(core_msi, "backend_free_bytes", lambda backend: measured.append(1) or 1)
    model, clip, vae, _ = models
    groups = []
    original = core_msi.train_msi_faces
    monkeypatch.setattr(core_msi, "train_msi_faces",
                        lambda backend, images, *a, **k: groups.append(images.shape[0]) or original(backend, images, *a, **k))
    one_by_one, latent = _run(invert, image=aligned, model=model, clip=clip, vae=vae, mode="lite", steps=2,
                              learning_rate=5e-3, inversion_steps=4, timesteps_per_step=1, seed=23,
                              official_uint8_quirk=False)
    assert measured and groups == [1, 1]
    torch.testing.assert_close(one_by_one.stage_conds, embeds.stage_conds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(latent["samples"], key_latent["samples"], atol=1e-5, rtol=1e-4)


def _sample(comfy, models, aligned, mask, embeds, step_scale=1.0, seed=7, **extra):
    """Embedding Scheduler → Identity Energy Guidance → Privacy Sampler on ``aligned`` faces with their key-E."""
    model, clip, vae, recognizer = models
    nodes_ = comfy.node_classes
    with torch.inference_mode():
        (null,) = nodes_["CLIPTextEncode"]().encode(clip, "")
    (conditioning,) = _run(nodes_["DiffPrivacy_EmbeddingScheduler"], embeds=embeds, null_conditioning=null,
                           task="anonymize", switch_timestep=400)
    guidance, _ = _guidance(comfy, models, aligned, step_scale)
    return _run(nodes_["DiffPrivacy_PrivacySampler"], model=model, vae=vae, conditioning=conditioning,
                guidance=guidance, steps=SAMPLER_STEPS, strength=0.6, batch_size=BATCH, seed=seed,
                paste_below_timestep=300, image=aligned, background_mask=mask, embeds=embeds, **extra)


def _guidance(comfy, models, source, step_scale=1.0):
    return _run(comfy.node_classes["DiffPrivacy_IdentityEnergyGuidance"], recognizer=models[3], source=source,
                mode="anonymize", step_schedule="official", step_scale=step_scale, diversity_weight=1.0,
                crop="official", gradient_target="x0", max_grad_norm=0.0, max_identity_similarity=1.0)


def test_privacy_sampler_on_two_faces_equals_two_single_face_runs(comfy_inprocess, models, two_faces):
    """N = 2 faces in one run (one N-face conditioning tiled over the sample-major batch, per-face background paste)
    give each face what it gets alone, to float precision: no face is conditioned or pasted with the other's.
    Guidance is off here (step_scale 0): with the random test recognizer its gradient amplifies float noise of the
    batched UNet ~1000× (measured: latents 6e-4 apart on average after 2 guided steps, while guidance itself
    moves them by 2e-2), so the guidance's own separation is checked exactly on its gradient in the next test.
    Also: N×B images, a gate per face, one receipt over both faces' key-E, one preview per face."""
    from core.keys import stage_conds_digest

    aligned, mask, (embeds, _), alone = two_faces
    images, latent, receipt, _, preview = _sample(comfy_inprocess, models, aligned, mask, embeds, step_scale=0.0)
    assert images.shape == (2 * BATCH, SIZE, SIZE, 3) and latent["samples"].shape[0] == 2 * BATCH
    assert preview.shape == (2, SIZE, SIZE, 3)
    assert receipt.keys_digest == stage_conds_digest(embeds.stage_conds)
    assert [f.index for f in receipt.report.faces] == [0, 1]
    assert all({s.face for s in f.scores} == {f.index} and len(f.scores) == BATCH for f in receipt.report.faces)
    for i, (single, _) in enumerate(alone):
        single_images, single_latent, single_receipt, *_ = _sample(comfy_inprocess, models, aligned[i : i + 1],
                                                                   mask[i : i + 1], single, step_scale=0.0)
        # sample b of face i is image b·N + i (measured ≤ 5.3e-6 apart on latents of magnitude 20)
        torch.testing.assert_close(latent["samples"][i::2], single_latent["samples"], atol=1e-4, rtol=0)
        torch.testing.assert_close(images[i::2], single_images, atol=1e-4, rtol=0)
        ours = torch.tensor([s.similarity for s in receipt.report.faces[i].scores])
        theirs = torch.tensor([s.similarity for s in single_receipt.report.faces[0].scores])
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (latent["samples"][0] - latent["samples"][1]).abs().mean() > 1e-2  # the two faces differ


def test_guidance_of_two_faces_guides_each_sample_by_its_own_face(comfy_inprocess, models, two_faces):
    """Identity Energy Guidance on two sources, bound as Privacy Sampler binds it: the gradient of a sample-major
    batch is, sample by sample, the gradient each face's own guidance gives its samples (its own source embedding,
    diversity among its own samples only); with the faces swapped it is not."""
    aligned, _, _, _ = two_faces
    sampler = _module(comfy_inprocess, "privacy_sampler")
    both = sampler.bind_guidance(_guidance(comfy_inprocess, models, aligned)[0], models[2], models[0])
    x0 = 0.5 * torch.randn(2 * BATCH, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        g, _ = both.gradient(x0)
        sims = both.similarities(x0)
        for i in range(2):
            own = sampler.bind_guidance(_guidance(comfy_inprocess, models, aligned[i : i + 1])[0], models[2], models[0])
            g_own, _ = own.gradient(x0[i::2])
            torch.testing.assert_close(g[i::2], g_own, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(sims[i::2], own.similarities(x0[i::2]), atol=1e-6, rtol=0)
            other, _ = own.gradient(x0[1 - i :: 2])
            assert (g[1 - i :: 2] - other).abs().amax() > 100 * 1e-6


def test_face_counts_must_agree(comfy_inprocess, models, two_faces):
    """Guidance or key-E of another number of faces than the source is refused before sampling: otherwise a face
    would be guided or conditioned with another face's identity."""
    aligned, mask, (embeds, _), alone = two_faces
    with pytest.raises(ValueError, match=r"holds 1 face\(s\), but the key-E at its 'embeds' input holds 2"):
        _sample(comfy_inprocess, models, aligned[:1], mask[:1], embeds)
    model, _, vae, _ = models
    guidance, _ = _guidance(comfy_inprocess, models, aligned)
    with pytest.raises(ValueError, match=r"holds 1 face\(s\), but the guidance .* holds 2"):
        _run(comfy_inprocess.node_classes["DiffPrivacy_PrivacySampler"], model=model, vae=vae, conditioning=[],
             guidance=guidance, steps=SAMPLER_STEPS, strength=0.6, batch_size=BATCH, seed=7, paste_below_timestep=300,
             image=aligned[:1])


# ------------------------------------------------------------------------------------------- the keys
def test_save_privacy_keys_needs_the_alignment_for_several_faces(comfy_inprocess, two_faces):
    from core.report import PrivacyReport
    from core.keys import stage_conds_digest

    _, _, (embeds, key_latent), _ = two_faces
    types = _module(comfy_inprocess, "types")
    report = PrivacyReport(task="anonymize", preset="custom", settings={}, model={}, faces=[], outside_faces=[],
                           seconds=0.0)
    receipt = types.PrivacyReceipt(stage_conds_digest(embeds.stage_conds), embeds.metadata.model_fingerprint, report)
    before = set(os.listdir(comfy_inprocess.models.keys))
    with pytest.raises(ValueError, match="alignment"):
        _run(comfy_inprocess.node_classes["DiffPrivacy_SaveKeys"], embeds=embeds, key_latent=key_latent,
             filename_prefix="mf_refused", passphrase=TEST_PASSPHRASE, allow_plaintext=False, receipt=receipt)
    assert set(os.listdir(comfy_inprocess.models.keys)) == before


@pytest.fixture()
def taesd_vae(comfy_inprocess, tmp_path, monkeypatch):
    """ComfyUI's own Load VAE → "taesd" on random-weight TAESD files in a models/vae_approx folder of this test."""
    from tests.nodes.helpers import offer_taesd

    offer_taesd(monkeypatch, tmp_path)
    loader = comfy_inprocess.node_classes["VAELoader"]
    assert "taesd" in loader.vae_list(loader)
    with torch.inference_mode():
        (vae,) = loader().load_vae("taesd")
    return vae


def test_privacy_sampler_guides_through_the_guidance_vae_and_gates_the_vaes_images(comfy_inprocess, models,
                                                                                   two_faces, taesd_vae):
    """With a TAESD at 'guidance_vae' the guidance gradient goes through it (the results differ from the same seed
    guided through 'vae'), while the images are 'vae''s decode of the latents and the gate's guiding score is the
    recognizer on exactly those images."""
    from core.energies import cosine_to_source

    aligned, mask, (embeds, _), _ = two_faces
    model, _, vae, recognizer = models
    images, latent, receipt, _, _ = _sample(comfy_inprocess, models, aligned, mask, embeds, guidance_vae=taesd_vae)
    plain, *_ = _sample(comfy_inprocess, models, aligned, mask, embeds)
    assert (images - plain).abs().amax() > 1e-3  # the guidance went another way
    with torch.inference_mode():
        torch.testing.assert_close(images, vae.decode(latent["samples"]))  # output through 'vae'
    settings = receipt.report.settings
    assert settings["guidance_decoder"] == "the VAE at 'guidance_vae'"
    # the gate's guiding scores: the recognizer on the output images (not on the guidance VAE's decode)
    guidance, _ = _guidance(comfy_inprocess, models, aligned)
    with torch.no_grad():
        pixels = images.float().permute(0, 3, 1, 2).to(next(recognizer.parameters()).device) * 2 - 1
        f = recognizer(guidance.crop(pixels))
        expected = cosine_to_source(f.float(), guidance.source_embedding.to(f.device), faces=2).cpu()
    judged = {(s.face, s.sample): s.similarity for face in receipt.report.faces for s in face.scores
              if s.recognizer == recognizer.name}
    for k in range(images.shape[0]):
        assert judged[(k % 2, k // 2)] == pytest.approx(float(expected[k]), abs=1e-4)


def test_a_tiny_autoencoder_of_another_model_is_refused_at_guidance_vae(comfy_inprocess, models, two_faces,
                                                                        tmp_path, monkeypatch):
    """Load VAE → taesdxl (another latent space, the same 4 channels) is refused by name before any sampling."""
    import shutil

    from core.errors import UnsupportedModelError
    from tests.nodes.helpers import offer_taesd

    offer_taesd(monkeypatch, tmp_path)
    for part in ("encoder", "decoder"):
        shutil.copy(tmp_path / f"taesd_{part}.safetensors", tmp_path / f"taesdxl_{part}.safetensors")
    with torch.inference_mode():
        (xl,) = comfy_inprocess.node_classes["VAELoader"]().load_vae("taesdxl")
    aligned, mask, (embeds, _), _ = two_faces
    with pytest.raises(Exception, match="'guidance_vae'.*scale 0.13025.*taesdxl") as err:
        _sample(comfy_inprocess, models, aligned, mask, embeds, guidance_vae=xl)
    # the pack's own class (imported by ComfyUI under the custom node's package name)
    assert type(err.value).__name__ == UnsupportedModelError.__name__
