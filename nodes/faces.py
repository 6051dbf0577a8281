"""Face Align (ordinary photo → FFHQ-aligned crop) and Face Paste Back (protected crops → the photo)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..core import faces as face_ops
from ..core.keys import FaceGeometry
from ..core.pipeline import ProtectOptions
from .convert import check_size, rgb
from .schema import schema
from .types import CATEGORY, AlignmentType

#: the aligned crop's default side: the pipeline's (the paper's 512 px)
ALIGNED_SIZE = ProtectOptions().size
FACE_ALIGN_IMAGE = "photo at Face Align's 'image' input"


@dataclass(frozen=True)
class Alignment:
    aligned: face_ops.AlignedFace
    original: torch.Tensor  # [H,W,3] in [0,1], CPU
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # the detection box, photo pixels

    def geometry(self) -> FaceGeometry:
        """Where the face sits in the photo, for whole-photo keys (face number 1)."""
        a = self.aligned
        return FaceGeometry(number=1, box=self.box, matrix=a.matrix.tolist(), crop_size=a.size,
                            photo_size=a.source_size, quad=a.quad.tolist())


class FaceAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FaceAlign",
            display_name="Face Align",
            category=CATEGORY,
            description="Finds the one face in a photo (MTCNN) and cuts an FFHQ-aligned square crop, as the "
                        "paper's models expect. Fails with a clear message when there is no face or several.",
            inputs=[
                io.Image.Input("image", tooltip="A photo with one clearly visible face (first image of a batch)."),
                io.Int.Input("size", default=ALIGNED_SIZE, min=64, max=2048, step=64,
                             tooltip=f"Side of the aligned crop in pixels (SD1.x: {ALIGNED_SIZE})."),
                io.Float.Input("min_confidence", default=face_ops.MIN_FACE_PROBABILITY, min=0.5, max=1.0, step=0.01,
                               tooltip="Minimum detection probability of a face."),
            ],
            outputs=[
                io.Image.Output(display_name="aligned", tooltip="The aligned face crop."),
                AlignmentType.Output(display_name="alignment", tooltip="Geometry for Face Paste Back."),
                io.Mask.Output(display_name="background_mask",
                               tooltip="1 outside the face ellipse of the crop: background for Privacy Sampler."),
            ],
        )

    @classmethod
    def execute(cls, image, size, min_confidence) -> io.NodeOutput:
        photo = rgb(image[:1], FACE_ALIGN_IMAGE)
        check_size(photo, FACE_ALIGN_IMAGE)
        photo = photo[0].float().cpu()
        face = face_ops.single_face(photo, min_prob=min_confidence)
        aligned = face_ops.align_face(photo, face, size=size)
        mask = 1.0 - face_ops.face_mask_in_crop(size)
        return io.NodeOutput(aligned.crop.unsqueeze(0), Alignment(aligned, photo, face.box),
                             mask.float().unsqueeze(0))


class FacePasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_FacePasteBack",
            display_name="Face Paste Back",
            category=CATEGORY,
            description="Warps protected face crops back into the original photo with a feathered edge; "
                        "pixels outside the face region stay exactly as they were.",
            inputs=[
                io.Image.Input("faces", tooltip="Protected (or recovered) aligned crops, any batch size."),
                AlignmentType.Input("alignment", tooltip="From Face Align."),
                io.Float.Input("feather", default=face_ops.PASTE_FEATHER, min=0.0, max=0.5, step=0.01,
                               tooltip="Width of the soft edge, as a fraction of the face size."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="One full photo per face crop.")],
        )

    @classmethod
    def execute(cls, faces, alignment, feather) -> io.NodeOutput:
        crops = rgb(faces, "image at Face Paste Back's 'faces' input").float().cpu()
        out = face_ops.paste_back(alignment.original, crops, alignment.aligned, feather=feather)
        return io.NodeOutput(out if out.dim() == 4 else out.unsqueeze(0))
