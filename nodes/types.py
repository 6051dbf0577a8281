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
from ..core.recognizers import FaceCrop, FaceCrops, FaceRecognizer
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
    """key-E of one face — MSI stage tokens [S,D] and stage conditionings [S,77,D] — or of N faces in the order
    of MSI Invert's images — [N,S,D] and [N,S,77,D] (CPU float32), plus how they were made (one metadata: the
    faces share model, DDIM grid, MSI mode and crop size). One face keeps the 3-D/2-D layout of the first
    release, so single-face graphs and key files work as before.

    Raises:
        ValueError: tensors of other ranks, or tokens and conditionings of different face counts (when made).
    """

    stage_tokens: torch.Tensor
    stage_conds: torch.Tensor
    metadata: KeyMetadata

    def __post_init__(self):
        tokens, conds = self.stage_tokens, self.stage_conds
        if not ((tokens.dim(), conds.dim()) in ((2, 3), (3, 4))
                and (tokens.dim() == 2 or tokens.shape[0] == conds.shape[0])):
            raise ValueError(f"key-E must be stage tokens [S,D] with conditionings [S,77,D] (one face) or "
                             f"[N,S,D] with [N,S,77,D] (N faces), got {tuple(tokens.shape)} and "
                             f"{tuple(conds.shape)}")

    @property
    def num_faces(self) -> int:
        return 1 if self.stage_conds.dim() == 3 else int(self.stage_conds.shape[0])

    @property
    def face_conds(self) -> torch.Tensor:
        """Stage conditionings per face [N,S,77,D] (a view; N = 1 for single-face key-E)."""
        return self.stage_conds if self.stage_conds.dim() == 4 else self.stage_conds.unsqueeze(0)

    @property
    def face_tokens(self) -> torch.Tensor:
        """Stage tokens per face [N,S,D] (a view)."""
        return self.stage_tokens if self.stage_tokens.dim() == 3 else self.stage_tokens.unsqueeze(0)

    @classmethod
    def of_faces(cls, tokens: list[torch.Tensor], conds: list[torch.Tensor], metadata: KeyMetadata) -> "PrivacyEmbeds":
        """key-E of the faces in order from each face's tokens [S,D] and conditionings [S,77,D]; one face gives
        the single-face layout."""
        if len(tokens) == 1:
            return cls(tokens[0], conds[0], metadata)
        return cls(torch.stack(tokens), torch.stack(conds), metadata)


@dataclass(frozen=True)
class GuidanceSpec:
    """Everything identity guidance needs except the VAE decoder, which the sampler binds at run time. With N
    source faces ``source_embedding`` has N rows and the sampler's batch is sample-major (sample b of face i at
    row b·N + i); ``faces`` is N."""

    recognizer: FaceRecognizer
    crop: FaceCrop | FaceCrops
    source_embedding: torch.Tensor  # [N,D]: one row per source face (N = 1 for one face)
    mode: str
    diversity_weight: float
    step_size: StepSizeSchedule
    target: str
    max_grad_norm: float | None
    max_identity_similarity: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def faces(self) -> int:
        return int(self.source_embedding.shape[0]) if self.source_embedding.dim() == 2 else 1


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


#: the report's name of a VAE connected to 'guidance_vae' (ComfyUI does not say which file a VAE came from)
GUIDANCE_VAE_NAME = "the VAE at 'guidance_vae'"
GUIDANCE_VAE_TOOLTIP = ("Optional: a small VAE for the guidance gradient only, e.g. Load VAE → taesd (TAESD files in "
                        "models/vae_approx): guided steps cost far less. The results are still decoded, judged by "
                        "the identity gate and output through 'vae'. Must be an SD 1.x VAE (not taesdxl).")
