"""One place that builds the pack's node schemas (``io.Schema``) with what every node shares.

Search aliases: ComfyUI ≥ 0.4 lists them in the node search box (``io.Schema.search_aliases``); older versions
(0.3.75, the oldest supported) have no such field, so it is passed only where the installed ``io.Schema`` has it.
Node ids carry the ``DiffPrivacy_`` prefix and never change once shipped; neither does the order of their inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from comfy_api.latest import io

from .types import CATEGORY

#: Words people type when looking for face privacy, shared by every node of the pack.
COMMON_ALIASES = ("diff-privacy", "face privacy")
#: Extra search words per node id (the field's terms first).
SEARCH_ALIASES: dict[str, tuple[str, ...]] = {
    "DiffPrivacy_FaceAlign": ("face detect", "face crop", "ffhq align"),
    "DiffPrivacy_FacePasteBack": ("face paste", "face composite", "face restore paste"),
    "DiffPrivacy_EmbeddingScheduler": ("anonymize", "identity hiding", "conditioning schedule"),
    "DiffPrivacy_FaceRecognizerLoader": ("facenet", "arcface", "face recognition"),
    "DiffPrivacy_IdentityEnergyGuidance": ("anonymize", "de-identify", "identity guidance"),
    "DiffPrivacy_MSIInvert": ("textual inversion", "msi", "image inversion"),
    "DiffPrivacy_PrivacySampler": ("anonymize", "de-identify", "face anonymization", "face swap privacy"),
    "DiffPrivacy_Recover": ("recover face", "de-anonymize", "identity recovery"),
    "DiffPrivacy_FaceVerifierLoader": ("sface", "yunet", "face verification"),
    "DiffPrivacy_SaveImageClean": ("save image", "strip metadata", "no metadata"),
    "DiffPrivacy_SaveKeys": ("save keys", "encrypt keys", "recovery key"),
    "DiffPrivacy_LoadKeys": ("load keys", "decrypt keys", "recovery key"),
    "DiffPrivacy_ProtectFaces": ("anonymize", "de-identify", "face anonymization", "blur faces", "group photo"),
    "DiffPrivacy_FaceSelectionPreview": ("detect faces", "face numbers", "which faces"),
    "DiffPrivacy_RecoverPhoto": ("recover photo", "de-anonymize", "restore original"),
    "DiffPrivacy_SavePhotoKeys": ("save keys", "encrypt keys", "recovery key"),
}


def supports_search_aliases() -> bool:
    """Whether the installed ComfyUI's ``io.Schema`` has a ``search_aliases`` field."""
    return any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def aliases_for(node_id: str) -> list[str]:
    """The search aliases of ``node_id``: its own words, then the pack's common ones (no duplicates)."""
    words = SEARCH_ALIASES.get(node_id, ()) + COMMON_ALIASES
    return list(dict.fromkeys(words))


def schema(*, node_id: str, **fields: Any) -> io.Schema:
    """``io.Schema`` for one of the pack's nodes: category Diff-Privacy unless given, search aliases where the
    installed ComfyUI supports them."""
    fields.setdefault("category", CATEGORY)
    if supports_search_aliases():
        fields.setdefault("search_aliases", aliases_for(node_id))
    return io.Schema(node_id=node_id, **fields)
