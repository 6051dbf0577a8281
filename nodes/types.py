"""Custom socket types shared by the pack's nodes and the payloads they carry.

Type names are part of saved workflows: never rename them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from comfy_api.latest import io

from ..core.energies import StepSizeSchedule
from ..core.keys import KeyMetadata, PhotoKeys
from ..core.recognizers import FaceCrop, FaceRecognizer
from ..core.report import PrivacyReport

PrivacyEmbedsType = io.Custom("PRIVACY_EMBEDS")
GuidanceType = io.Custom("PRIVACY_GUIDANCE")
RecognizerType = io.Custom("FACE_RECOGNIZER")
AlignmentType = io.Custom("FACE_ALIGNMENT")
VerifiersType = io.Custom("FACE_VERIFIERS")
ReceiptType = io.Custom("PRIVACY_RECEIPT")
PhotoKeysType = io.Custom("PRIVACY_PHOTO_KEYS")

CATEGORY = "Diff-Privacy"


@dataclass(frozen=True)
class PrivacyEmbeds:
    """key-E: MSI stage tokens [S,D] and stage conditionings [S,77,D] (CPU float32) plus how they were made."""

    stage_tokens: torch.Tensor
    stage_conds: torch.Tensor
    metadata: KeyMetadata


@dataclass(frozen=True)
class GuidanceSpec:
    """Everything identity guidance needs except the VAE decoder, which the sampler binds at run time."""

    recognizer: FaceRecognizer
    crop: FaceCrop
    source_embedding: torch.Tensor
    mode: str
    diversity_weight: float
    step_size: StepSizeSchedule
    target: str
    max_grad_norm: float | None
    max_identity_similarity: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyReceipt:
    """Proof that Privacy Sampler's results passed the identity gate (core/gate.py), bound to the keys of
    that run: Save Privacy Keys writes nothing without a receipt whose ``keys_digest`` equals
    ``core.keys.stage_conds_digest`` of the key-E it is asked to save, and whose ``model_fingerprint`` equals
    the keys' own. Made only by Privacy Sampler after the gate passed; holds no secret."""

    keys_digest: str
    model_fingerprint: str
    report: PrivacyReport
    #: Protect Faces on a batch of photos: one report per photo, each covering ``samples`` consecutive images
    reports: tuple[PrivacyReport, ...] = ()
    samples: int = 1

    def report_for(self, image: int, images: int) -> PrivacyReport:
        """The report of image ``image`` of a batch of ``images`` (per photo when the receipt has several)."""
        if self.reports and images == len(self.reports) * self.samples:
            return self.reports[image // self.samples]
        return self.report


@dataclass(frozen=True)
class PhotoKeysBatch:
    """Protect Faces' keys: one whole-photo key set per photo of the batch (secret), in batch order."""

    photos: tuple[PhotoKeys, ...]
