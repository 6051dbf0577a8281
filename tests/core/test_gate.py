"""The identity gate: NaN and over-bound scores fail closed with a listing; hide only needs finite scores."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import ProtectionFailedError
from core.gate import IdentityScore, check_identity_gate, identity_scores
from core.pipeline import score_results


def test_scores_pass_only_when_finite_and_within_the_bound():
    assert IdentityScore("facenet", 0, 0, 0.2, 0.5).passed
    assert IdentityScore("facenet", 0, 0, 0.5, 0.5).passed  # the bound itself is allowed (1.0 disables the check)
    assert not IdentityScore("facenet", 0, 0, 0.51, 0.5).passed
    assert not IdentityScore("facenet", 0, 0, math.nan, 0.5).passed
    assert not IdentityScore("facenet", 0, 0, math.nan, 1.0).passed  # even with the check "disabled"
    assert not IdentityScore("facenet", 0, 0, math.inf, None).passed
    assert IdentityScore("facenet", 0, 0, 0.99, None).passed


def test_nan_fails_closed_where_max_would_have_let_it_through():
    sims = torch.tensor([0.1, float("nan"), 0.2])
    assert not bool(sims.max() > 0.5)  # the comparison the old check relied on: NaN compares false
    with pytest.raises(ProtectionFailedError, match=r"(?s)1 of 3.*facenet, face 0, sample 1: cosine not a number"):
        check_identity_gate(identity_scores("facenet", sims, 0.5))


def test_every_failure_is_listed_with_recognizer_face_sample_value_and_bound():
    scores = (identity_scores("facenet", torch.tensor([0.1, 0.7]), 0.5, face=2)
              + identity_scores("sface", torch.tensor([0.4, 0.2]), 0.363, face=2))
    with pytest.raises(ProtectionFailedError) as info:
        check_identity_gate(scores)
    message = str(info.value)
    assert "2 of 4" in message and "nothing was output" in message
    assert "facenet, face 2, sample 1: cosine 0.700 (bound 0.500)" in message
    assert "sface, face 2, sample 0: cosine 0.400 (bound 0.363)" in message
    assert "sample 0: cosine 0.100" not in message  # passing scores are not listed


def test_an_empty_gate_releases_nothing():
    with pytest.raises(ProtectionFailedError, match="no identity check ran"):
        check_identity_gate([])


class _FixedVerifier:
    def __init__(self, name, values, bound):
        self.name, self.values, self.bound = name, torch.tensor(values), bound

    def similarities(self, source, results):
        assert source.shape == (8, 8, 3) and results.shape[1:] == (8, 8, 3)
        return self.values

    def faces_detected(self, results):
        return [True] * len(results)


def test_a_verifier_that_still_matches_fails_closed_even_when_the_guiding_recognizer_passes():
    source, results = torch.rand(8, 8, 3), torch.rand(2, 8, 8, 3)
    guiding = ("facenet", torch.tensor([0.05, 0.1]))
    ok = score_results("anonymize", guiding, source, results, [_FixedVerifier("sface", [0.1, 0.2], 0.363)], 0.5)
    assert check_identity_gate(ok) == ok and len(ok) == 4
    leaky = score_results("anonymize", guiding, source, results, [_FixedVerifier("sface", [0.1, 0.8], 0.363)], 0.5)
    with pytest.raises(ProtectionFailedError, match="sface, face 0, sample 1: cosine 0.800"):
        check_identity_gate(leaky)
    # hiding keeps the machine identity on purpose: high scores pass, NaN does not
    hide = score_results("hide", ("facenet", torch.tensor([0.9, 0.95])), source, results,
                         [_FixedVerifier("sface", [0.8, float("nan")], 0.363)], 0.5)
    with pytest.raises(ProtectionFailedError, match="sface, face 0, sample 1: cosine not a number"):
        check_identity_gate(hide)
