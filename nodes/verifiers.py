"""Face Verifier Loader: recognizers that judge the results after sampling (core/verifiers.py)."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.errors import WeightsNotFoundError
from ..core.pipeline import ProtectOptions
from ..core.recognizers import FaceCrop, load_recognizer
from ..core.verifiers import (SFACE_COSINE_THRESHOLD, RecognizerVerifier, SFaceVerifier, VerifierUnavailableError,
                              load_sface, require_sface, sface_available)
from .comfy.folders import list_recognizer_files, missing_recognizer_message, recognizer_folders, recognizer_path
from .comfy.models import to_compute_device
from .schema import schema
from .types import CATEGORY, VerifiersType

SFACE = SFaceVerifier.name
#: FaceNet / ArcFace as verifiers: the pack's anonymization bound (Identity Energy Guidance's default)
RECOGNIZER_BOUND = ProtectOptions().max_identity_similarity


def verifier_names() -> list[str]:
    """What the loader offers: "sface" when OpenCV imports and SFace + YuNet are in models/face_recognition,
    then the FaceNet / ArcFace files there."""
    return ([SFACE] if sface_available(recognizer_folders()) else []) + list_recognizer_files()


def default_bound(names: list[str]) -> float:
    """The bound widget's default: OpenCV's SFace threshold when sface is the default choice, else the pack's
    FaceNet / ArcFace bound."""
    return SFACE_COSINE_THRESHOLD if names[:1] == [SFACE] else RECOGNIZER_BOUND


class FaceVerifierLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = verifier_names()
        return schema(
            node_id="DiffPrivacy_FaceVerifierLoader",
            display_name="Face Verifier Loader",
            category=CATEGORY,
            description="Loads an independent face verifier for Privacy Sampler's identity gate: OpenCV SFace "
                        "with its YuNet detector (needs the opencv-python-headless package and both ONNX files "
                        "in models/face_recognition) or a FaceNet / ArcFace file. The guidance optimises "
                        "against its own recognizer only; a result is released only when every verifier "
                        "agrees it no longer matches the source. Chain loaders to add several.",
            inputs=[
                io.Combo.Input("verifier_name", options=names,
                               tooltip="sface: OpenCV Zoo's face_recognition_sface*.onnx + "
                                       "face_detection_yunet*.onnx in models/face_recognition (listed when OpenCV "
                                       "is installed and both files are there); or a FaceNet / ArcFace weight "
                                       "file from that folder."),
                io.Float.Input("bound", default=default_bound(names), min=-1.0, max=1.0, step=0.001,
                               tooltip=f"anonymize: a result fails (nothing is output) when its cosine similarity "
                                       f"to the source under this verifier exceeds this. SFace: "
                                       f"{SFACE_COSINE_THRESHOLD} is OpenCV's published same-person threshold; "
                                       f"FaceNet / ArcFace: {RECOGNIZER_BOUND} as Identity Energy Guidance. "
                                       f"hide: only a finite score is required."),
                VerifiersType.Input("verifiers", optional=True,
                                    tooltip="Verifiers from another Face Verifier Loader; this one is added."),
            ],
            outputs=[VerifiersType.Output(display_name="verifiers",
                                          tooltip="For Privacy Sampler's 'verifiers' input.")],
        )

    @classmethod
    def validate_inputs(cls, verifier_name):
        if verifier_name == SFACE:
            try:
                require_sface(recognizer_folders())
            except (VerifierUnavailableError, WeightsNotFoundError) as error:
                return f"Face Verifier Loader: {error}"
            return True
        if verifier_name not in list_recognizer_files():
            return missing_recognizer_message(verifier_name)
        return True

    @classmethod
    def execute(cls, verifier_name, bound, verifiers=None) -> io.NodeOutput:
        if verifier_name == SFACE:
            verifier = load_sface(recognizer_folders(), bound=bound)
        else:
            recognizer = to_compute_device(load_recognizer(recognizer_path(verifier_name), "auto"))
            verifier = RecognizerVerifier(recognizer, FaceCrop.official(recognizer), bound)
        return io.NodeOutput((*(verifiers or ()), verifier))
