"""The identity gate: the one decision whether protected results may be released.

Every path that releases results — Privacy Sampler, its GUIDER output, Protect Faces, the CLI — scores each
result against its source under every configured recognizer (the guiding one and the verifiers of
core/verifiers.py) and calls :func:`check_identity_gate`. A result passes only if every score is a finite
number and, where the recognizer has a bound (anonymization), at most that bound. NaN never passes: ``max()``
over a tensor holding NaN compares false, which is how a NaN once slipped through a ``worst > bound`` check.
Nothing (image, key, report) may be written before the gate has passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .errors import ProtectionFailedError


@dataclass(frozen=True)
class IdentityScore:
    """One result's cosine similarity to its source under one recognizer.

    Attributes:
        recognizer: the recognizer's name (e.g. "facenet_vggface2", "sface").
        face: index of the face in the photo (0 for a single aligned face).
        sample: index of the sample among the B results of that face.
        similarity: cosine similarity in [−1, 1], or NaN when the computation failed.
        bound: the largest similarity that still counts as "not the same person"; None for scores that are
            only reported (hiding keeps the machine identity on purpose), which must still be finite.
    """

    recognizer: str
    face: int
    sample: int
    similarity: float
    bound: Optional[float]

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.similarity):
            return False
        return self.bound is None or self.similarity <= self.bound


def identity_scores(recognizer: str, similarities: torch.Tensor, bound: Optional[float],
                    face: int = 0) -> list[IdentityScore]:
    """Scores for the B results of one face from a similarity tensor [B] (one host copy)."""
    values = similarities.detach().float().reshape(-1).cpu().tolist()
    return [IdentityScore(recognizer, int(face), i, float(v), None if bound is None else float(bound))
            for i, v in enumerate(values)]


def describe(score: IdentityScore) -> str:
    """"facenet_vggface2, face 1, sample 0: cosine 0.612 (bound 0.500)" — no embedding, no pixels."""
    value = f"{score.similarity:.3f}" if math.isfinite(score.similarity) else "not a number"
    rule = "must be a finite number" if score.bound is None else f"bound {score.bound:.3f}"
    return f"{score.recognizer}, face {score.face}, sample {score.sample}: cosine {value} ({rule})"


def check_identity_gate(scores: Iterable[IdentityScore]) -> list[IdentityScore]:
    """Return the scores if every one passes; else raise, listing every failing score.

    Raises:
        ProtectionFailedError: naming recognizer, face, sample, value and bound of each failure, and saying
            that nothing was output. An empty list of scores also fails: a gate that checked nothing cannot
            release anything.
    """
    scores = list(scores)
    if not scores:
        raise ProtectionFailedError("Protection failed closed: no identity check ran, so nothing was output.")
    failed = [s for s in scores if not s.passed]
    if failed:
        lines = "\n".join(f"  - {describe(s)}" for s in failed)
        raise ProtectionFailedError(
            f"Protection failed closed: {len(failed)} of {len(scores)} identity checks did not pass; nothing was "
            f"output (no image, key or report).\n{lines}\nRaise the guidance step scale or the strength, use "
            "another seed, or remove a face from the selection.")
    return scores
