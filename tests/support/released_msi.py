"""Parameter counts of the released Diff-Privacy MSI module (``Attentions``), for checking core.msi.MSIFaithful.

The release stacks 5 bias-free projections, the stage vectors T, two single-token CrossAttention blocks
(bias-free q/k/v, biased to_out) and a final Linear. MSIFaithful keeps only what reaches the tokens.
"""
from __future__ import annotations

from core.diffusion import NUM_STAGES
from core.msi import NUM_LEVELS


def released_parameter_count(vision_dim: int = 1024, token_dim: int = 768, heads: int = 8,
                             dim_head: int = 64) -> int:
    """All parameters of the released module, including the parts that never reach the output (all of attn1,
    attn2's q and k)."""
    inner = heads * dim_head
    projections = NUM_LEVELS * (vision_dim * token_dim + token_dim * token_dim)
    stage = NUM_STAGES * token_dim
    cross_attention = 3 * token_dim * inner + inner * token_dim + token_dim
    final = token_dim * token_dim + token_dim
    return projections + stage + 2 * cross_attention + final


def dead_released_parameter_count(token_dim: int = 768, heads: int = 8, dim_head: int = 64) -> int:
    """Released parameters that do not influence the tokens: attn1 entirely, attn2's to_q and to_k."""
    inner = heads * dim_head
    attn1 = 3 * token_dim * inner + inner * token_dim + token_dim
    return attn1 + 2 * token_dim * inner
