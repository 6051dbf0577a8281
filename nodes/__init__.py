"""ComfyUI glue: thin V3 nodes that convert ComfyUI types and call ``core``; the ``comfy`` subpackage (the bridge)
holds every call into ComfyUI's internals."""
from __future__ import annotations

from .comfy.folders import register_folders
from .embedding_scheduler import EmbeddingScheduler
from .faces import FaceAlign, FacePasteBack
from .identity_guidance import FaceRecognizerLoader, IdentityEnergyGuidance
from .keys import LoadPrivacyKeys, SavePhotoKeys, SavePrivacyKeys
from .msi_invert import MSIInvert
from .privacy_sampler import PrivacySampler, Recover
from .protect_faces import FaceSelectionPreview, ProtectFaces, RecoverPhoto
from .save_image import SaveProtectedImage
from .verifiers import FaceVerifierLoader

NODES = [
    FaceAlign,
    MSIInvert,
    EmbeddingScheduler,
    FaceRecognizerLoader,
    IdentityEnergyGuidance,
    PrivacySampler,
    FacePasteBack,
    SavePrivacyKeys,
    LoadPrivacyKeys,
    Recover,
    FaceVerifierLoader,
    SaveProtectedImage,
    FaceSelectionPreview,
    ProtectFaces,
    RecoverPhoto,
    SavePhotoKeys,
]

register_folders()
