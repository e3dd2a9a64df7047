"""tokenizer.py: video semantic tokenizer — SKELETON, being written (see the issue). The helper replaces this docstring."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- copied primitive: attention (identical in tokenizer.py, lm.py, diffusion.py; tests/test_copies.py) ----
def attention(q, k, v, mask=None, impl="sdpa"):
    """softmax(q kᵀ / √d) v, restricted by mask: the whole of attention.

    q (B, H, Nq, D); k, v (B, H, Nk, D); mask bool, broadcastable to
    (B, H, Nq, Nk), True where a query may look at a key. impl="manual" runs the
    math below; impl="sdpa" runs PyTorch's fused kernel with the same mask (tests
    assert the two agree)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in fp32 so bf16 runs of the manual path stay a fair reference
    return scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, Nq, D)
# ---- end copied primitive ----


# ---- copied primitive: rope (identical in tokenizer.py, lm.py; tests/test_copies.py) ----
def rope_angles(pos, n_pairs, theta=10000.0):
    """Rotary angles (N, n_pairs) for positions pos (N,): channel pair i turns by
    pos · theta^(-i / n_pairs), fast for low pairs, slow for high ones
    (RoFormer, arXiv 2104.09864)."""
    freqs = theta ** (-torch.arange(n_pairs, dtype=torch.float32, device=pos.device) / n_pairs)
    return pos.float()[:, None] * freqs[None, :]  # (N, n_pairs)


def apply_rope(x, cos, sin):
    """Rotate each adjacent channel pair (x[..., 2i], x[..., 2i+1]) of x (..., N, 2P)
    by the angles whose cosines and sines are cos, sin (N, P)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, P) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., N, P, 2)
    return out.flatten(-2).type_as(x)  # (..., N, 2P)
# ---- end copied primitive ----
