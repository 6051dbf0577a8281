"""Face Align (every selected face of every photo → FFHQ-aligned crops) and Face Paste Back (protected crops → the
photos).

Batch semantics of the building-block graph: Face Align turns an IMAGE batch of P photos into the N faces to
protect, photo-major and in reading order within a photo (``aligned`` [N,S,S,3]); MSI Invert, Identity Energy
Guidance and Privacy Sampler keep those N faces apart; Privacy Sampler returns B samples of each face in
sample-major order (sample b of face i at b·N + i); Face Paste Back puts every face's sample b into its photo and
returns B photos per input photo, photo-major (photo p's sample b at p·B + b).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..core import faces as face_ops
from ..core.errors import DiffPrivacyError
from ..core.keys import FaceGeometry
from ..core.pipeline import ProtectOptions, compose_photo, fallback_alignments, fallback_kind, select_faces
from ..core.sampling import face_samples
from ..core.selection import FacePlan, NoFaceSelectedError, draw_face_numbers
from .comfy.models import to_compute_device
from .convert import check_size, rgb
from .protect_faces import selection_from, selection_inputs
from .schema import schema
from .types import CATEGORY, AlignmentType, RecognizerType

#: the aligned crop's default side: the pipeline's (the paper's 512 px)
ALIGNED_SIZE = ProtectOptions().size
FACE_ALIGN = "Face Align"
FACE_ALIGN_IMAGE = "photo at Face Align's 'image' input"
PASTE_BACK = "Face Paste Back"


@dataclass(frozen=True)
class AlignedPhotoFace:
    """One face to protect: the index of its photo in Face Align's IMAGE batch, its number in that photo
    (1-based, reading order, as the preview shows it), its alignment and its detection box (photo pixels)."""

    photo: int
    number: int
    aligned: face_ops.AlignedFace
    box: tuple[float, float, float, float]

    def geometry(self) -> FaceGeometry:
        """Where the face sits in its photo, for whole-photo keys."""
        a = self.aligned
        return FaceGeometry(number=self.number, box=self.box, matrix=a.matrix.tolist(), crop_size=a.size,
                            photo_size=a.source_size, quad=a.quad.tolist())


@dataclass(frozen=True)
class PhotoFaces:
    """One photo of the batch: the original [H,W,3] in [0,1] (CPU), the alignments of its fallback faces (to be
    obscured, geometry only) and the plan that decided every detected face."""

    original: torch.Tensor
    fallbacks: tuple[face_ops.AlignedFace, ...]
    plan: Optional[FacePlan] = None


@dataclass(frozen=True)
class Alignment:
    """Face Align's FACE_ALIGNMENT: the N faces to protect (``faces[k]`` is the k-th image of its ``aligned``
    output: photo-major, reading order), every photo of the batch, and how fallback faces are obscured."""

    faces: tuple[AlignedPhotoFace, ...]
    photos: tuple[PhotoFaces, ...]
    fallback: str = "fill"

    def faces_of(self, photo: int) -> list[int]:
        """Positions k (in ``faces``) of the faces of photo ``photo``, in reading order."""
        return [k for k, face in enumerate(self.faces) if face.photo == photo]

    @property
    def crop_size(self) -> int:
        return self.faces[0].aligned.size


def _in_photo(exc: Exception, photo: int, photos: int) -> Exception:
    """The same error with the node's name (and the photo's position in a batch) in front of its message."""
    where = FACE_ALIGN if photos == 1 else f"{FACE_ALIGN}, photo {photo + 1} of {photos}"
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # an error type with another constructor: keep it as it is
        return exc


class FaceAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FaceAlign",
            display_name=FACE_ALIGN,
            category=CATEGORY,
            description="Finds every face of every photo of the batch (MTCNN), applies the face selection and cuts "
                        "an FFHQ-aligned square crop of each face to protect, as the paper's models expect: the "
                        "faces of photo 1 in reading order, then photo 2's, … Faces left out are reported on the "
                        "preview (numbered, as the selection counts them); a selected face the method cannot "
                        "process stops the run with a list, unless a fallback is chosen.",
            inputs=[
                io.Image.Input("image", tooltip="The photo(s): every selected face of every photo of the batch "
                                                "is aligned."),
                io.Int.Input("size", default=ALIGNED_SIZE, min=64, max=2048, step=64,
                             tooltip=f"Side of the aligned crops in pixels (SD1.x: {ALIGNED_SIZE})."),
                io.Float.Input("min_confidence", default=face_ops.MIN_FACE_PROBABILITY, min=0.5, max=1.0, step=0.01,
                               tooltip="Minimum detection probability of a face."),
                *selection_inputs(optional=True),
                io.Image.Input("reference", optional=True,
                               tooltip="A photo of the person, for the selections match_reference and "
                                       "except_reference."),
                RecognizerType.Input("recognizer", optional=True,
                                     tooltip="Judges the reference match (Face Recognizer Loader); needed by the "
                                             "reference selections."),
            ],
            outputs=[
                io.Image.Output(display_name="aligned",
                                tooltip="The aligned crops of the N faces to protect [N,S,S,3]: photo 1's faces in "
                                        "reading order, then photo 2's, …"),
                AlignmentType.Output(display_name="alignment",
                                     tooltip="Where each face sits in its photo, the photos and their fallback "
                                             "faces: for Face Paste Back and Save Privacy Keys."),
                io.Mask.Output(display_name="background_mask",
                               tooltip="1 outside the face ellipse of each crop [N,S,S]: background for Privacy "
                                       "Sampler."),
                io.Image.Output(display_name="preview",
                                tooltip="Each photo with its faces boxed and numbered: green = protected, grey = "
                                        "left alone by the selection, orange = obscured by the fallback."),
            ],
        )

    @classmethod
    def execute(cls, image, size, min_confidence, selection="all", face_numbers="", fallback="fail",
                match_threshold=-1.0, reference=None, recognizer=None) -> io.NodeOutput:
        photos = rgb(image, FACE_ALIGN_IMAGE).float().cpu()
        check_size(photos, FACE_ALIGN_IMAGE)
        choice = selection_from(FACE_ALIGN, selection, face_numbers, fallback, match_threshold)
        choice = dataclasses.replace(choice, min_confidence=float(min_confidence))
        if choice.needs_reference and recognizer is None:
            raise ValueError(f"{FACE_ALIGN}: selection '{selection}' compares faces with the reference photo; "
                             f"connect a Face Recognizer Loader to its 'recognizer' input.")
        ref = None
        if reference is not None:
            what = f"image at {FACE_ALIGN}'s 'reference' input"
            ref = rgb(reference, what).float().cpu()
            check_size(ref, what)
            ref = ref[0]
        judge = to_compute_device(recognizer) if recognizer is not None and choice.needs_reference else None
        faces, infos, previews = [], [], []
        for p, photo in enumerate(photos):
            try:
                plan = select_faces(judge, photo, choice, ref)
            except (DiffPrivacyError, ValueError) as exc:
                raise _in_photo(exc, p, len(photos)) from None
            for planned in plan.with_action("protect"):
                aligned = face_ops.align_face(photo, planned.detection, size=size)
                faces.append(AlignedPhotoFace(p, planned.number, aligned, tuple(float(v) for v in planned.box)))
            infos.append(PhotoFaces(photo, tuple(fallback_alignments(photo, plan)), plan))
            previews.append(draw_face_numbers(photo, plan))
        if not faces:
            raise NoFaceSelectedError(
                f"{FACE_ALIGN}: no selected face can be processed by the method (every one gets the fallback "
                f"'{choice.fallback}'), so there is nothing for MSI Invert and Privacy Sampler. Use Protect Faces, "
                f"which obscures them without the method, or a larger photo.")
        crops = torch.stack([f.aligned.crop for f in faces])
        mask = (1.0 - face_ops.face_mask_in_crop(size)).float().expand(len(faces), -1, -1).contiguous()
        alignment = Alignment(tuple(faces), tuple(infos), fallback_kind(choice))
        return io.NodeOutput(crops, alignment, mask, torch.stack(previews))


def _at_size(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Crops [B,S,S,3] resized (bilinear) to size×size when S differs."""
    if crops.shape[1] == size:
        return crops
    x = F.interpolate(crops.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=crops.shape[1] > size)
    return x.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


class FacePasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FacePasteBack",
            display_name=PASTE_BACK,
            category=CATEGORY,
            description="Warps every protected face back into its photo with a feathered edge (colour matched at "
                        "the seam) and obscures the fallback faces; pixels outside the face regions stay exactly "
                        "as they were. N faces with B samples each (Privacy Sampler's images) give B photos per "
                        "photo of Face Align's batch.",
            inputs=[
                io.Image.Input("faces", tooltip="The protected (or recovered) aligned crops: B samples of each of "
                                                "Face Align's N faces, sample-major (Privacy Sampler's images)."),
                AlignmentType.Input("alignment", tooltip="From Face Align."),
                io.Float.Input("feather", default=face_ops.PASTE_FEATHER, min=0.0, max=0.5, step=0.01,
                               tooltip="Width of the soft edge, as a fraction of the face size."),
                io.Boolean.Input("seam_colour_match", default=True, optional=True,
                                 tooltip="Shift each face's colour to agree with the photo on the paste seam (as "
                                         "Protect Faces does)."),
            ],
            outputs=[io.Image.Output(display_name="images",
                                     tooltip="B photos per input photo: photo 1's B results, then photo 2's, …")],
        )

    @classmethod
    def execute(cls, faces, alignment, feather, seam_colour_match=True) -> io.NodeOutput:
        crops = rgb(faces, f"image at {PASTE_BACK}'s 'faces' input").float().cpu()
        n = len(alignment.faces)
        if crops.shape[0] % n:
            raise ValueError(
                f"{PASTE_BACK}: its 'faces' input holds {crops.shape[0]} crops, but the alignment has {n} faces; it "
                f"needs the same number of samples of every face (connect Privacy Sampler's 'images', made from "
                f"the same Face Align's 'aligned').")
        batch = crops.shape[0] // n
        out = []
        for p, photo in enumerate(alignment.photos):
            pasted = []
            for k in alignment.faces_of(p):
                aligned = alignment.faces[k].aligned
                face_crops = _at_size(face_samples(crops, n, k), aligned.size)
                if seam_colour_match:
                    face_crops = face_ops.match_seam_colour(face_crops, aligned.crop, feather)
                pasted.append((aligned, face_crops))
            photos, _ = compose_photo(photo.original, pasted, photo.fallbacks, alignment.fallback, batch, feather)
            out.append(photos)
        return io.NodeOutput(torch.cat(out))
