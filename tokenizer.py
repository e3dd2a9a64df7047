"""tokenizer.py: the semantic tokenizer that turns a video into a short "sentence" of discrete tokens.

Frozen per-frame features of the semantic frames (RGB frames 0, 4, 8, ...) go into a
transformer encoder together with learned queries: one I-group of n_i queries for the first
frame, then one group of n_p queries per later frame (the same P-queries repeated). The
queries' outputs are squashed to len(levels) channels and FSQ-quantized: one id per query,
N = n_i + (T-1)·n_p ids per clip. A transformer decoder fills one mask token per feature
position from the ids. Both attention masks are frame-causal, so frame f's features depend
only on groups ≤ f: an LM can write the video group by group and the decoder can decode any
prefix of groups, which is what lets long videos stream.

"Group", as this file (and lm.py) uses the word. In the paper a frame group is a run of frames
that share one set of query tokens. Here every semantic frame has its own set, so a group is
one semantic frame's queries, and the tokens they become: group 0 is the n_i I-queries of
semantic frame 0, group k ≥ 1 the n_p P-queries of semantic frame k (RGB frame 4k, aligned with
VAE latent frame k). "Groups ≤ f" are the first n_i + f·n_p tokens of a segment.

    video (B,3,T_rgb,H,W) -FrozenPatchFeatures-> feats (B,T,C,h,w) -Encoder-> z (B,N,D)
        -FSQ-> ids (B,N) -FSQ.indices_to_codes-> codes (B,N,D) -Decoder-> feats (B,T,C,h,w)

Shapes: B batch; T semantic frames (13 full, 5 tiny); C feature channels (768 / 192); h×w the
feature grid (30×45 / 4×4); N tokens (1,218 / 32); D code channels (FSQ: len(levels) = 4; VQ: 16); W width;
H heads; S = T·h·w + N the transformer's sequence (frame tokens or mask tokens, then queries).

References: LanDiff, Yin et al. 2025 (arXiv 2503.04606); TiTok, 1D tokenization with learned
queries, mask tokens, ln_pre/ln_post and the tanh head (arXiv 2406.07550); FSQ, Mentzer et al.
(arXiv 2309.15505) and vector-quantize-pytorch's FSQ; RoFormer (arXiv 2104.09864); Theia
(arXiv 2407.20179), the release's frozen feature network. Every number: docs/DESIGN.md §3 and §7.

Deliberately different from the release:
- We train FSQ (tiny: levels (8,5,5,5); (8,8,8,4) would give the release's 2,048 codes) instead of
  a 2,048 × 16-d VQ with EMA, k-means init and a commitment loss: no codebook collapse, and the
  loss is feature MSE only. The full preset keeps the release's VQ lookup (quantizer="vq") so that
  its weights load (release.py). The encoder ends in one Linear(W, D) (release: Linear(W, 768),
  then the VQ's 768 → 16), the decoder starts with one Linear(D, W) (release: the VQ's 16 → 768,
  then Linear(768, W)): two linear maps in a row are one.
- Attention is the copied `attention` below (the math, or SDPA with the same bool mask), not
  flex attention with block masks; each mask is one comparison of per-token index vectors.
- q, k, v come from one fused Linear (release: wq, wk, wv; concatenate them to load).
- Tiny feature source: FrozenPatchFeatures, a frozen seeded random patch embedding, stands in
  for Theia; the release also standardises Theia features with a dataset mean/std, ours are
  O(1) by construction. No autocast inside the model: the caller picks the dtype.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TokenizerConfig:
    # semantic features in: `frames` frames of (feat_dim, feat_h, feat_w) per segment. Tiny: one 192-d
    # vector per 8×8 patch (3·8² values, as Theia's ViT-B/16 gives 768 = 3·16² per 16×16 patch), a grid
    # at half the VAE latent's resolution, as at full size (30×45 features, 60×90 latents)
    feat_dim: int = 192
    frames: int = 5  # semantic frames per segment (full: 13 = RGB frames 0, 4, ..., 48)
    feat_h: int = 4
    feat_w: int = 4
    # encoder and decoder: pre-LN transformers of the same width, heads and MLP
    width: int = 128
    enc_depth: int = 2
    dec_depth: int = 2
    heads: int = 4
    mlp: int = 256  # 2·width: a cheaper step, so more of them in the same time (full: 4·width)
    # the token layout and the vocabulary
    n_i: int = 8  # I-frame queries (group 0): one flat object (colour, shape, place) needs few (full: 330)
    n_p: int = 4  # P-frame queries per later frame (groups 1..frames-1)
    levels: tuple = (8, 5, 5, 5)  # FSQ levels per channel: 8·5·5·5 = 1,000 codes
    quantizer: str = "fsq"  # "fsq" (ours, trained here) | "vq" (the release's codebook, for its weights)
    vq_codes: int = 2048  # vq: codebook entries
    vq_dim: int = 16  # vq: dimension of each entry
    rope_split: tuple = (4, 6, 6)  # rotary pairs for (time, rows, cols); sums to head_dim / 2
    attn_impl: str = "sdpa"  # "sdpa" | "manual"
    # feature source (FrozenPatchFeatures): RGB size, patch size, RGB frames per semantic frame
    image_h: int = 32
    image_w: int = 32
    patch: int = 8
    time_stride: int = 4
    feat_seed: int = 0

    def __post_init__(self):  # checked here, not under "checks": PRESETS below are built at import
        self.levels = tuple(self.levels)  # a list when read from JSON
        self.rope_split = tuple(self.rope_split)
        if self.attn_impl not in ("sdpa", "manual"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'manual', got {self.attn_impl!r}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width must be heads × an even head dim, got width {self.width}, heads {self.heads}")
        if len(self.rope_split) != 3 or 2 * sum(self.rope_split) != self.width // self.heads:
            raise ValueError(f"rope_split must be 3 pair counts (time, rows, cols) summing to head_dim/2 = "
                             f"{self.width // self.heads // 2}, got {self.rope_split}")
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"quantizer must be 'fsq' or 'vq', got {self.quantizer!r}")
        if not self.levels or min(self.levels) < 3:
            raise ValueError(f"levels must be integers >= 3 (the reference FSQ rejects 2), got {self.levels}")
        if (self.image_h, self.image_w) != (self.feat_h * self.patch, self.feat_w * self.patch):
            raise ValueError(f"image size must be the feature grid × patch = {self.feat_h * self.patch}×"
                             f"{self.feat_w * self.patch}, got {self.image_h}×{self.image_w}")
        if min(self.frames, self.n_i, self.n_p, self.enc_depth, self.dec_depth, self.time_stride) < 1:
            raise ValueError("frames, n_i, n_p, enc_depth, dec_depth and time_stride must be >= 1")

    @property
    def n_tokens(self):  # tokens per segment: one I-group, then one P-group per later frame
        return self.n_i + (self.frames - 1) * self.n_p

    @property
    def codebook_size(self):
        return math.prod(self.levels) if self.quantizer == "fsq" else self.vq_codes

    @property
    def code_dim(self):  # D: channels of one token's code
        return len(self.levels) if self.quantizer == "fsq" else self.vq_dim


PRESETS = {
    "tiny": TokenizerConfig(),  # 0.64 M params (encoder 0.29 M, decoder 0.35 M); 24 tokens
    # 173.3 M (encoder 85.9 M, decoder 87.4 M) + a 2,048 × 16 codebook; 1,218 tokens. The release holds
    # 174.5 M: its encoder ends in Linear(768, 768) then the VQ's Linear(768, 16), its decoder starts with
    # the VQ's Linear(16, 768) then Linear(768, 768); with nothing between them, each pair is one linear
    # map, so ours holds one Linear(768, 16) and one Linear(16, 768) (release.py multiplies the pairs out).
    "full": TokenizerConfig(
        feat_dim=768, frames=13, feat_h=30, feat_w=45, width=768, enc_depth=12, dec_depth=12,
        heads=12, mlp=3072, n_i=330, n_p=74, levels=(8, 8, 8, 4), rope_split=(8, 12, 12),
        quantizer="vq", image_h=480, image_w=720, patch=16),
}


# ---- copied primitive: attention (identical in tokenizer.py, lm.py, diffusion.py; tests/test_project.py) ----
def attention(q, k, v, mask=None, impl="sdpa"):
    """softmax(q kᵀ / √d) v, restricted by mask: the whole of attention.

    q (B, H, Nq, D); k, v (B, H, Nk, D); mask bool, broadcastable to
    (B, H, Nq, Nk), True where a query may look at a key. impl="manual" runs the
    math below; impl="sdpa" runs PyTorch's fused kernel with the same mask (tests
    assert the two agree)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # BEGIN SOLUTION attention: scores q k^T / sqrt(d), -inf where mask is False, softmax over keys in fp32, times v
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in fp32 so bf16 runs of the manual path stay a fair reference
    return scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, Nq, D)
    # END SOLUTION
# ---- end copied primitive ----


# ---- copied primitive: rope (identical in tokenizer.py, lm.py; tests/test_project.py) ----
def rope_angles(pos, n_pairs, theta=10000.0):
    """Rotary angles (N, n_pairs) for positions pos (N,): channel pair i turns by
    pos · theta^(-i / n_pairs), fast for low pairs, slow for high ones
    (RoFormer, arXiv 2104.09864)."""
    # BEGIN SOLUTION rope: pair i turns by pos * theta^(-i / n_pairs); an outer product of positions and frequencies
    freqs = theta ** (-torch.arange(n_pairs, dtype=torch.float32, device=pos.device) / n_pairs)
    return pos.float()[:, None] * freqs[None, :]  # (N, n_pairs)
    # END SOLUTION


def apply_rope(x, cos, sin):
    """Rotate each adjacent channel pair (x[..., 2i], x[..., 2i+1]) of x (..., N, 2P)
    by the angles whose cosines and sines are cos, sin (N, P)."""
    # BEGIN SOLUTION rope: split the last dim into adjacent pairs (x1, x2), rotate each by its angle in fp32
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, P) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., N, P, 2)
    return out.flatten(-2).type_as(x)  # (..., N, 2P)
    # END SOLUTION
# ---- end copied primitive ----


# ---------------------------------------------------------------------------- blocks
class FrozenPatchFeatures(nn.Module):
    """The toy stand-in for Theia (ViT-B/16, 768-d, frozen): a frozen random linear patch
    embedding of the RGB frames 0, time_stride, 2·time_stride, ..., the same frames the VAE keeps
    as its latent frames. The tokenizer only needs frozen per-frame features that keep what is
    in a frame and where; a random projection of each patch (3·p² values → feat_dim, square and
    invertible at tiny size, 192 → 192) keeps all of it. At full size it only stands in for the shape.
    The weight comes from its own torch.Generator(feat_seed): the same features on every run,
    whatever the global RNG did. It is a buffer and sees no gradient."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.feat_seed)
        weight = torch.randn(cfg.feat_dim, 3, cfg.patch, cfg.patch, generator=generator)
        # / sqrt(fan-in) keeps features O(1) (about unit variance on a coloured patch), like standardised Theia
        self.register_buffer("weight", weight / math.sqrt(3 * cfg.patch ** 2))

    @torch.no_grad()
    def forward(self, video):
        """video (B, 3, T_rgb, H, W) in [-1, 1], T_rgb = 1 + time_stride·k -> feats (B, 1+k, C, h, w)."""
        cfg = self.cfg
        check_video(cfg, video)
        frames = video[:, :, :: cfg.time_stride]  # (B, 3, T, H, W): the semantic frames
        B, _, T = frames.shape[:3]
        x = frames.transpose(1, 2).reshape(B * T, 3, cfg.image_h, cfg.image_w)  # (B·T, 3, H, W)
        # measured from black (x + 1): an empty frame gives zero features, the object O(1) ones
        x = F.conv2d(x.to(self.weight.dtype) + 1, self.weight, stride=cfg.patch)  # (B·T, C, h, w)
        return x.view(B, T, cfg.feat_dim, cfg.feat_h, cfg.feat_w)  # (B, T, C, h, w)


class FSQ(nn.Module):
    """Finite scalar quantization (arXiv 2309.15505): bound each of the D channels, round it to
    one of L_i levels; the codebook is the implicit grid of prod(L) points, nothing is learned.
    The core of vector-quantize-pytorch's FSQ (default options): same ops in the same order,
    so codes and indices agree with it bit for bit (its indices are int32, ours int64)."""

    def __init__(self, levels):
        super().__init__()
        self.level_counts = tuple(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        # index = Σ_i digit_i · basis_i, basis = (1, L0, L0·L1, ...): the first level is least significant
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), dim=0, dtype=torch.int32)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def codebook_size(self):
        return math.prod(self.level_counts)

    def forward(self, z):
        """z (..., D) -> codes (..., D) on the grid in [-1, 1], indices (...) int64."""
        check_fsq_input(self.level_counts, z)
        dtype = z.dtype
        if dtype not in (torch.float32, torch.float64):
            z = z.float()  # quantize in fp32, as the reference: bf16 tanh is too coarse near the level boundaries
        # half-width a hair above (L-1)/2: tanh never reaches ±1, the 1e-3 lets the outer levels round in
        half_l = (self.levels - 1) * (1 + 1e-3) / 2
        # even L has no level at 0: bound to (-L/2, L/2 - 1) instead of (-(L-1)/2, (L-1)/2) ...
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        # ... and shift the input so that z = 0 still lands exactly on level 0 (tanh(shift)·half_l = offset)
        shift = torch.atanh(offset / half_l)
        # BEGIN SOLUTION fsq: bounded = tanh(z + shift) * half_l - offset; round it with a straight-through gradient; divide by L // 2
        bounded = torch.tanh(z + shift) * half_l - offset  # (..., D), level i at the integer i
        # round half to even; the forward pass sees the rounded value, the gradient passes straight through
        rounded = bounded + (bounded.round() - bounded).detach()
        codes = rounded / (self.levels // 2)  # (..., D): integers -> [-1, 1]
        # END SOLUTION
        return codes.to(dtype), self.codes_to_indices(codes)

    def codes_to_indices(self, codes):
        half_width = self.levels // 2
        # BEGIN SOLUTION fsq: level numbers 0..L-1 per channel, then the mixed-radix number sum(digit * basis)
        digits = codes * half_width + half_width  # (..., D): level number 0..L-1 of each channel
        return (digits * self.basis).sum(dim=-1).round().long()  # (...,) the mixed-radix number
        # END SOLUTION

    def indices_to_codes(self, indices):
        half_width = self.levels // 2
        # BEGIN SOLUTION fsq: digit i = (index // basis_i) % L_i, then back from level numbers to [-1, 1]
        digits = (indices[..., None] // self.basis) % self.levels  # (..., D)
        return (digits - half_width) / half_width  # (..., D) float32
        # END SOLUTION


class VQ(nn.Module):
    """Vector quantization (VQ-VAE, arXiv 1711.00937), the release's tokenizer: a codebook of K
    vectors of D channels; a code is the nearest entry (Euclidean), its index the token id. Here it
    serves the release's trained codebook (release.py loads it); its EMA updates, k-means init and
    commitment loss are not reproduced (ours trains FSQ), so the codebook is a buffer."""

    def __init__(self, codes, dim):
        super().__init__()
        self.register_buffer("codebook", torch.empty(codes, dim))  # (K, D), filled by initialize_weights or a load

    @property
    def codebook_size(self):
        return self.codebook.shape[0]

    def forward(self, z):
        """z (..., D) -> codes (..., D) (the nearest entries, straight-through gradient), indices (...) int64."""
        check_vq_input(self.codebook.shape[1], z)
        zf = z.float()
        book = self.codebook.float()
        # |z - c|^2 = |z|^2 - 2 z·c + |c|^2, without the (..., K, D) difference tensor
        dist = zf.pow(2).sum(-1, keepdim=True) - 2 * zf @ book.T + book.pow(2).sum(-1)  # (..., K)
        indices = dist.argmin(dim=-1)
        codes = book[indices]  # (..., D)
        return (zf + (codes - zf).detach()).to(z.dtype), indices

    def indices_to_codes(self, indices):
        return self.codebook[indices].float()  # (..., D)


def token_times(frames, hw, n_i, n_p, device=None):
    """The index vectors every mask is one comparison of, for the sequence
    [frame tokens: `frames` frames × hw, row-major | queries: n_i, then n_p per later frame]:
    time (S,) = the frame of a frame token, the group of a query (I = 0, P_k = k);
    is_frame (S,) bool."""
    arange = functools.partial(torch.arange, device=device)
    time = torch.cat([arange(frames).repeat_interleave(hw),  # frame tokens
                      arange(1).repeat_interleave(n_i),  # I-queries: group 0
                      arange(1, frames).repeat_interleave(n_p)])  # P-queries of groups 1..frames-1
    is_frame = arange(len(time)) < frames * hw
    return time, is_frame


def encoder_mask(time, is_frame):
    """(S, S) bool, row = who looks, column = at whom (docs/DESIGN.md §3): frame tokens see frames
    <= their own; I-queries see frame 0 and earlier I-queries; P-queries of group k see frames <= k
    and every earlier query. Frame tokens never see a query; queries form a causal 1D sequence."""
    # BEGIN SOLUTION masks: key time <= query time, and the key is a frame token or (query and key are queries) an earlier query
    order = torch.arange(len(time), device=time.device)
    earlier_query = ~is_frame[:, None] & (order[None, :] <= order[:, None])  # queries come after all frames
    return (time[None, :] <= time[:, None]) & (is_frame[None, :] | earlier_query)
    # END SOLUTION


def decoder_mask(time):
    """(S, S) bool: every token sees everything of time <= its own. Mask tokens of frame f see
    mask tokens of frames <= f and the latents of groups <= f (I, P1..Pf); latents of group k see
    frames <= k and groups <= k. So frame f is decoded from groups <= f only."""
    # BEGIN SOLUTION masks: one comparison of the time vector with itself (row = query, column = key)
    return time[None, :] <= time[:, None]
    # END SOLUTION


@functools.lru_cache(maxsize=16)
def sequence_layout(frames, h, w, n_i, n_p, rope_split, decoder, device):
    """(cos, sin) (S, head_dim/2) of the 3D RoPE and the (S, S) mask, built once per shape.
    Frame token (f, row, col) has rotary position (f, row, col); query n has (n, n, n). Each axis
    turns its own band of pairs (rope_split, the release's 8/12/12 of 32) at its own frequencies."""
    time, is_frame = token_times(frames, h * w, n_i, n_p, device)
    mask = decoder_mask(time) if decoder else encoder_mask(time, is_frame)
    # BEGIN SOLUTION rope_3d: positions (S, 3): (f, row, col) per frame token, (n, n, n) per query; rope_angles per axis, concatenated
    grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (frames, h, w)), indexing="ij")
    query = torch.arange(len(time) - frames * h * w, device=device)  # 0..N-1
    pos = torch.cat([torch.stack(grid, dim=-1).view(-1, 3), torch.stack([query, query, query], dim=-1)])  # (S, 3)
    angles = torch.cat([rope_angles(pos[:, axis], rope_split[axis]) for axis in range(3)], dim=-1)  # (S, head_dim/2)
    # END SOLUTION
    return angles.cos(), angles.sin(), mask


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN x), then x + MLP(LN x). No attention biases and
    exact GELU, as the release (TiTok blocks with bias=False)."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.attn_impl = cfg.attn_impl
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x, cos, sin, mask):
        B, S, W = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, W // self.heads)  # (B, S, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, H, S, Dh)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        y = attention(q, k, v, mask, self.attn_impl)  # (B, H, S, Dh)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, W))  # (B, S, W)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """feats (B, T, C, h, w) -> z (B, N, D): frame tokens and queries in one sequence under the
    encoder mask; the queries' outputs, normed and projected to D channels, are the tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.feat_dim, cfg.width)  # the release's 1×1 Conv2d, on channels
        self.i_queries = nn.Parameter(torch.empty(cfg.n_i, cfg.width))
        self.p_queries = nn.Parameter(torch.empty(cfg.n_p, cfg.width))  # one set, shared by every P-frame
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.enc_depth))
        self.norm_post = nn.LayerNorm(cfg.width)
        self.to_code = nn.Linear(cfg.width, cfg.code_dim)

    def forward(self, feats):
        cfg = self.cfg
        B, T = feats.shape[:2]
        n_frame_tokens = T * cfg.feat_h * cfg.feat_w
        x = feats.permute(0, 1, 3, 4, 2).reshape(B, n_frame_tokens, cfg.feat_dim)  # (B, T·h·w, C)
        x = self.patch_embed(x)  # (B, T·h·w, W)
        queries = torch.cat([self.i_queries, self.p_queries.repeat(T - 1, 1)])  # (N, W): groups 0..T-1
        x = torch.cat([x, queries.expand(B, -1, -1)], dim=1)  # (B, S, W)
        cos, sin, mask = sequence_layout(T, cfg.feat_h, cfg.feat_w, cfg.n_i, cfg.n_p, cfg.rope_split, False, x.device)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.to_code(self.norm_post(x[:, n_frame_tokens:]))  # (B, N, D): the queries' outputs


class Decoder(nn.Module):
    """codes (B, N, D) -> feats (B, T, C, h, w), T = 1 + (N - n_i) / n_p: one learned mask token
    per feature position, then the projected codes, under the decoder mask; the mask tokens'
    outputs go through the release's tanh head back to C channels."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.from_code = nn.Linear(cfg.code_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.empty(cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.dec_depth))
        self.norm_post = nn.LayerNorm(cfg.width)
        self.head = nn.Sequential(  # the release's two-layer tanh head
            nn.Linear(cfg.width, 2 * cfg.width), nn.Tanh(), nn.Linear(2 * cfg.width, cfg.feat_dim))

    def forward(self, codes):
        cfg = self.cfg
        B, N = codes.shape[:2]
        T = 1 + (N - cfg.n_i) // cfg.n_p  # semantic frames: one per group
        n_frame_tokens = T * cfg.feat_h * cfg.feat_w
        x = torch.cat([self.mask_token.expand(B, n_frame_tokens, -1), self.from_code(codes)], dim=1)  # (B, S, W)
        cos, sin, mask = sequence_layout(T, cfg.feat_h, cfg.feat_w, cfg.n_i, cfg.n_p, cfg.rope_split, True, x.device)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        x = self.head(self.norm_post(x[:, :n_frame_tokens]))  # (B, T·h·w, C): the mask tokens' outputs
        return x.view(B, T, cfg.feat_h, cfg.feat_w, cfg.feat_dim).permute(0, 1, 4, 2, 3)  # (B, T, C, h, w)


# ---------------------------------------------------------------------------- the tokenizer
class SemanticTokenizer(nn.Module):
    """Encoder -> FSQ (or the release's VQ) -> Decoder. encode/decode take any prefix of groups: T = 1..frames
    semantic frames <-> n_i + (T-1)·n_p tokens (a longer clip is several segments)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = FSQ(cfg.levels) if cfg.quantizer == "fsq" else VQ(cfg.vq_codes, cfg.vq_dim)
        self.decoder = Decoder(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # Linear layers keep PyTorch's default init and LayerNorms weight 1, bias 0, as the release.
        # The learned tokens (I- and P-queries, the mask token) start as the release's width^-0.5 · N(0, 1);
        # the first LayerNorm rescales them.
        for token in (self.encoder.i_queries, self.encoder.p_queries, self.decoder.mask_token):
            nn.init.normal_(token, std=self.cfg.width ** -0.5)
        # The projection into FSQ starts small (z ≈ 0.05 · N(0, 1), zero bias): every token starts at the
        # grid's centre, where tanh is linear and every level is within reach. At the default init's scale
        # the first, still aimless updates push z into tanh's flat tails, where the straight-through
        # gradient fades and many tokens round to the same outer code (codebook collapse).
        nn.init.normal_(self.encoder.to_code.weight, std=0.05 * self.cfg.width ** -0.5)
        nn.init.zeros_(self.encoder.to_code.bias)
        if isinstance(self.quantizer, VQ):  # a random codebook of unit-scale entries until the release's is loaded
            nn.init.normal_(self.quantizer.codebook)
        # Deliberately no zero-init of the decoder's head (DiT zero-inits its final layer): a zero head
        # passes no gradient to the layers below it, so the decoder first settles on the mean feature,
        # an output that ignores the tokens, and is slow to leave it.

    def forward(self, feats):
        """feats (B, T, C, h, w) -> (reconstruction (B, T, C, h, w), indices (B, N)), for training."""
        check_feats(self.cfg, feats)
        codes, indices = self.quantizer(self.encoder(feats))  # (B, N, D), (B, N)
        return self.decoder(codes), indices

    @torch.no_grad()
    def encode(self, feats):
        """feats (B, T, C, h, w) -> token ids (B, n_i + (T-1)·n_p)."""
        check_feats(self.cfg, feats)
        _, indices = self.quantizer(self.encoder(feats))
        return indices

    @torch.no_grad()
    def decode(self, indices):
        """token ids (B, n_i + k·n_p) -> feats (B, k+1, C, h, w); frame f depends on groups <= f only."""
        check_indices(self.cfg, indices)
        return self.decoder(self.quantizer.indices_to_codes(indices).to(self.decoder.from_code.weight.dtype))


# ---------------------------------------------------------------------------- loss
def tokenizer_loss(model, feats):
    """Feature-reconstruction MSE, a scalar (the release's loss without its VQ commitment term).
    The token ids of the same features come from model.encode(feats)."""
    recon, _ = model(feats)
    return F.mse_loss(recon.float(), feats.float())


def codebook_usage(indices, codebook_size):
    """(fraction of the codebook used, perplexity exp(entropy) of the code histogram) for logs:
    perplexity = codebook_size means perfectly uniform use, 1 means a single code."""
    probs = torch.bincount(indices.flatten(), minlength=codebook_size).double() / indices.numel()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()  # 0·log 0 counts as 0
    return (probs > 0).double().mean().item(), entropy.exp().item()


# ---------------------------------------------------------------------------- checks
def check_video(cfg, video):
    if (video.ndim != 5 or video.shape[1] != 3 or tuple(video.shape[3:]) != (cfg.image_h, cfg.image_w)
            or (video.shape[2] - 1) % cfg.time_stride):
        raise ValueError(f"video must be (B, 3, 1+{cfg.time_stride}k, {cfg.image_h}, {cfg.image_w}), "
                         f"got {tuple(video.shape)}")


def check_fsq_input(level_counts, z):
    if z.shape[-1] != len(level_counts):
        raise ValueError(f"FSQ{level_counts} needs (..., {len(level_counts)}) inputs, got {tuple(z.shape)}")


def check_vq_input(dim, z):
    if z.shape[-1] != dim:
        raise ValueError(f"VQ needs (..., {dim}) inputs, got {tuple(z.shape)}")


def check_feats(cfg, feats):
    if (feats.ndim != 5 or tuple(feats.shape[2:]) != (cfg.feat_dim, cfg.feat_h, cfg.feat_w)
            or not 1 <= feats.shape[1] <= cfg.frames):
        raise ValueError(f"feats must be (B, T, {cfg.feat_dim}, {cfg.feat_h}, {cfg.feat_w}) with 1 <= T <= "
                         f"{cfg.frames}, got {tuple(feats.shape)}")


def check_indices(cfg, indices):
    lengths = [cfg.n_i + k * cfg.n_p for k in range(cfg.frames)]  # groups 0..k
    if indices.ndim != 2 or indices.shape[1] not in lengths or indices.is_floating_point():
        raise ValueError(f"indices must be integer (B, n_i + k·n_p) = (B, {cfg.n_i} + k·{cfg.n_p}) with k in "
                         f"0..{cfg.frames - 1} (a full segment: {cfg.n_tokens}), "
                         f"got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= cfg.codebook_size):
        raise ValueError(f"indices must lie in [0, {cfg.codebook_size}), got values in "
                         f"[{indices.min().item()}, {indices.max().item()}]")


# ---------------------------------------------------------------------------- demo
if __name__ == "__main__":  # each preset's size and compression (tests/test_tokenizer.py runs the model)
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = SemanticTokenizer(preset)
        pixels = (1 + preset.time_stride * (preset.frames - 1)) * preset.image_h * preset.image_w
        print(f"{name}: {preset.frames} frames of {preset.feat_dim}×{preset.feat_h}×{preset.feat_w} -> "
              f"{preset.n_tokens} tokens ({preset.n_i} + {preset.frames - 1}×{preset.n_p}; "
              f"{pixels / preset.n_tokens:,.0f} pixels per token), {preset.codebook_size} codes; "
              f"encoder {sum(p.numel() for p in model.encoder.parameters()):,} + "
              f"decoder {sum(p.numel() for p in model.decoder.parameters()):,} parameters")
