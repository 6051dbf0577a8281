"""ComfyUI glue: thin V3 nodes that convert ComfyUI types and call ``core``; ``bridge`` holds every comfy.* call."""
from __future__ import annotations

from . import bridge
from .embedding_scheduler import EmbeddingScheduler
from .faces import FaceAlign, FacePasteBack
from .identity_guidance import FaceRecognizerLoader, IdentityEnergyGuidance
from .keys import LoadPrivacyKeys, SavePrivacyKeys
from .msi_invert import MSIInvert
from .privacy_sampler import PrivacySampler, Recover

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
]

bridge.register_folders()
