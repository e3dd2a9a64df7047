"""lm.py: the language model of LanDiff, which writes a video down as semantic token ids.

The idea (LanDiff §3.2): the semantic tokenizer turns a clip into a short 1D stream of discrete
ids (1,218 per 13-frame segment at full size: an I-group of 330 codes for the first frame, then
12 P-groups of 74 for what changes). A Llama-style causal transformer learns that stream as a
language model learns text, conditioned on the prompt and two micro-conditions (frame count,
motion score). Sampling continues the stream one id at a time with a KV cache and classifier-free
guidance; wherever the layout needs a structure token it is forced, never sampled.

Pipeline: prompt -> TextEncoder (tiny) / T5-XXL (full) -> text (B, L, text_dim) -> generate -> codes -> tokenizer.
The sequence (docs/DESIGN.md §4); a second segment repeats everything from [SOI] on, before the one [EOS]:
    [BOS] [frames] [motion] [text x L] [SOI] n_i codes [EOI] ([SOP] n_p codes [EOP]) x (frames-1) [EOS]
[frames], [motion] and the text slots are vectors, not ids; the loss covers SOI and every id after it.

Shapes: B batch, L text tokens, N positions, W width, H heads, D = W/H, V = codebook_size + 7.

References: LanDiff (arXiv 2503.04606); Llama (arXiv 2302.13971): RMSNorm (1910.07467), gated MLP (2002.05202),
RoPE (2104.09864); GELU (1606.08415); CFG (2207.12598); top-p (1904.09751); micro-conditions as DiT's t (2212.09748).

Differences from the release, on purpose:
- Fixed-length batches, not packed sequences: the text always takes L slots, the padding (zero vectors) through its MLP too.
- Micro-conditions are mapped from their allowed range onto [0, 1000] before the sinusoidal
  features (SemanticLM.micro_embed); the release embeds the raw values (micro_raw=True, to load it).
  CFG's null row reads null_motion (tiny: the world's mean speed, so guidance pushes toward the speed asked; release: its own).
- The tiny preset also embeds and scores each code by its FSQ digits (code_levels, code_digits): a
  1,000-row table alone learns too slowly from a few thousand clips (docs/DESIGN.md §4).
- q, k, v and the MLP's two input matrices are fused into one matmul each (speed). Rows map one to one onto
  transformers' LlamaForCausalLM (q/k rows permuted: we turn channel pairs, Llama halves); but for our final LayerNorm, the same.
- No EOS prediction when sampling (n_segments sets the length), no teacher forcing, no motion-score
  head, no chunked cross-entropy, no autocast inside the module. The tiny preset has its own
  word-level TextEncoder, trained with the LM (release: frozen Flan-T5-XXL, which release.py loads).
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIALS = ("EOS", "BOS", "SOI", "EOI", "SOP", "EOP", "PAD")  # ids codebook_size + 0..6, in the release's order


@dataclass
class LMConfig:
    # the token stream (tokenizer.py): codebook and the layout of one segment
    codebook_size: int = 1000  # FSQ levels (8, 5, 5, 5)
    code_levels: tuple = (8, 5, 5, 5)  # the tokenizer's FSQ levels: codes embedded and scored by digit too; () = no
    n_i: int = 8  # codes of the I-group (the segment's first semantic frame)
    n_p: int = 4  # codes of each P-group (each later semantic frame)
    frames: int = 5  # semantic frames per segment: one I-group, frames - 1 P-groups
    # the transformer
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 512  # hidden width of the gated MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attn_impl: str = "sdpa"  # "sdpa" | "manual"
    gelu: str = "none"  # the MLPs' GELU: "tanh" (the release's form) or "none" (exact: within 5e-4 of it, a faster CPU kernel)
    # conditioning
    text_dim: int = 128  # width of the text features (tiny: TextEncoder's width; full: T5-XXL's)
    text_len: int = 8  # most text tokens per prompt
    p_uncond: float = 0.1  # training: replace a sample's text by the learned null vector (CFG)
    micro_dim: int = 256  # sinusoidal features per micro-condition
    micro_hidden: int = 128  # hidden width of each micro-condition MLP (release: 512)
    frames_max: int = 32  # micro-condition `frames` (semantic frames of the clip) must lie in [1, frames_max]
    motion_max: float = 2.0  # micro-condition `motion` (motion score) must lie in [0, motion_max]
    micro_raw: bool = False  # embed the raw micro-condition values, as the release (its weights expect them)
    null_motion: float | None = 0.875  # CFG's null row: null text at this motion; tiny: the middle of world.py's [0.5, 1.25]
    # the tiny word-level TextEncoder (its width is text_dim)
    text_depth: int = 2
    text_heads: int = 4
    text_mlp: int = 256

    def __post_init__(self):
        if self.attn_impl not in ("sdpa", "manual") or self.gelu not in ("none", "tanh"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'manual' and gelu 'none' or 'tanh', got {self.attn_impl!r}, {self.gelu!r}")
        for w, h in (("width", "heads"), ("text_dim", "text_heads")):
            if getattr(self, w) % getattr(self, h) or (getattr(self, w) // getattr(self, h)) % 2:
                raise ValueError(f"{h} must split {w} into heads of even size (RoPE turns channel pairs), "
                                 f"got {w}={getattr(self, w)}, {h}={getattr(self, h)}")
        if min(self.codebook_size, self.n_i, self.n_p, self.frames, self.depth, self.text_len) < 1:
            raise ValueError("codebook_size, n_i, n_p, frames, depth and text_len must all be >= 1")
        self.code_levels = tuple(self.code_levels)  # a list when read back from JSON
        if self.code_levels and math.prod(self.code_levels) != self.codebook_size:
            raise ValueError(f"code_levels {self.code_levels} must multiply to codebook_size {self.codebook_size}")
        if not 0.0 <= self.p_uncond < 1.0 or self.frames_max < 1 or self.motion_max <= 0:
            raise ValueError(f"p_uncond must be in [0, 1), frames_max >= 1 and motion_max > 0, got {self.p_uncond}, "
                             f"{self.frames_max}, {self.motion_max}")
        if self.null_motion is not None and not 0.0 <= self.null_motion <= self.motion_max:
            raise ValueError(f"null_motion must be None or in [0, motion_max = {self.motion_max}], got {self.null_motion}")

    @property
    def vocab_size(self):
        return self.codebook_size + len(SPECIALS)

    @property
    def tokens_per_segment(self):  # codes only
        return self.n_i + (self.frames - 1) * self.n_p

    EOS = property(lambda self: self.codebook_size + 0)  # end of the whole stream
    BOS = property(lambda self: self.codebook_size + 1)  # start of the sequence
    SOI = property(lambda self: self.codebook_size + 2)  # start / end of an I-group
    EOI = property(lambda self: self.codebook_size + 3)
    SOP = property(lambda self: self.codebook_size + 4)  # start / end of a P-group
    EOP = property(lambda self: self.codebook_size + 5)
    PAD = property(lambda self: self.codebook_size + 6)  # in the vocabulary (release), never used here


PRESETS = {
    "tiny": LMConfig(),  # SemanticLM 1,446,528 params; TextEncoder 328,320 + 128 per vocabulary word
    "full": LMConfig(codebook_size=2048, n_i=330, n_p=74, frames=13, width=2048, depth=24, heads=16, mlp=11008,
                     text_dim=4096, text_len=512, micro_hidden=512, code_levels=(),  # the release's plain table
                     frames_max=128, motion_max=10.0, null_motion=None, gelu="tanh"),  # limits: ours; the rest as the release
    # SemanticLM 2,049,321,984 params (docs/DESIGN.md §4: 2.05 B); the text comes from T5-XXL, not included
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


# ---- copied primitive: timestep_embedding (identical in lm.py, diffusion.py; tests/test_project.py) ----
def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of scalars t (B,) -> (B, dim) = [cos(t·f_i), sin(t·f_i)]
    with f_i = max_period^(-i / (dim/2)): the Transformer's position code, used by
    DDPM/DiT for the diffusion time and here also for micro-conditions."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
# ---- end copied primitive ----


# ---------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich, arXiv 1910.07467; Llama's norm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Block(nn.Module):
    """Llama block: x + Attn(RMSNorm(x)), then x + W2(gelu(W1 h) * W3 h) with h = RMSNorm(x); no biases.

    cache (2, B, H, N_max, D): its keys and values; new ones go to start..start+N-1, queries see positions < start+N."""

    def __init__(self, width, heads, mlp, eps, attn_impl, gelu):
        super().__init__()
        self.heads = heads
        self.attn_impl = attn_impl
        self.gelu = gelu
        self.norm1 = RMSNorm(width, eps)
        self.qkv = nn.Linear(width, 3 * width, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(width, width, bias=False)
        self.norm2 = RMSNorm(width, eps)
        self.w13 = nn.Linear(width, 2 * mlp, bias=False)  # W1 (gate) and W3 (up) in one matmul
        self.w2 = nn.Linear(mlp, width, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        B, N, W = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k = apply_rope(qkv[:2], cos, sin)  # (B, H, N, D) each: q and k turned in one call
        v = qkv[2]
        if cache is not None:
            # BEGIN SOLUTION kv_cache: write k, v at positions start..start+N-1, then attend to every key up to start+N
            end = start + N
            cache[0, :, :, start:end] = k
            cache[1, :, :, start:end] = v
            k, v = cache[0, :, :, :end], cache[1, :, :, :end]  # (B, H, end, D): all keys so far
            # END SOLUTION
        a = attention(q, k, v, mask, self.attn_impl)  # (B, H, N, D)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, W))  # heads back side by side: (B, N, W)
        gate, up = self.w13(self.norm2(x)).chunk(2, dim=-1)  # (B, N, mlp) each
        return x + self.w2(F.gelu(gate, approximate=self.gelu) * up)


def _rope_table(n, head_dim, theta, device):
    ang = rope_angles(torch.arange(n, device=device), head_dim // 2, theta)  # (n, D/2)
    return ang.cos(), ang.sin()


def _normal_init(module):
    """GPT-style N(0, 0.02) for every linear and embedding, zero biases (the release's GPT._init_weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def code_digits(cfg):
    """Each code id's FSQ digits (tokenizer.py: id = sum_i digit_i * prod(levels before i)) as features
    (V, sum(levels) + len(levels)): one-hot per level, then each digit scaled to [-1, 1] (the quantized
    channel up to an affine map); zero rows for the structure ids."""
    sizes = torch.tensor(cfg.code_levels)
    digits = torch.arange(cfg.codebook_size)[:, None] // torch.cumprod(F.pad(sizes[:-1], (1, 0), value=1), 0) % sizes
    onehot = torch.cat([F.one_hot(digits[:, i], n) for i, n in enumerate(cfg.code_levels)], dim=1)
    table = torch.cat([onehot, digits / (sizes - 1) * 2 - 1], dim=1).float()  # (codebook, D_digits)
    return F.pad(table, (0, 0, 0, cfg.vocab_size - cfg.codebook_size))


# ---------------------------------------------------------------------------- the models
class TextEncoder(nn.Module):
    """The tiny preset's text encoder: one trained with the LM; the tiny DiT reads another, frozen. Prompts
    are lower-cased and split into words, punctuation dropped (a table of the captions' few dozen words learns
    in far fewer steps than bytes, docs/DESIGN.md §0); ids PAD = 0, UNK = 1, words[i] = i + 2. The word list is
    the state_dict's "_extra_state". Restore: enc = TextEncoder(cfg, sd["_extra_state"]); enc.load_state_dict(sd)"""

    PAD, UNK = 0, 1

    def __init__(self, cfg, words):
        super().__init__()
        self.cfg = cfg
        self.set_extra_state(list(words))
        self.embed = nn.Embedding(len(self.words) + 2, cfg.text_dim)
        self.blocks = nn.ModuleList(Block(cfg.text_dim, cfg.text_heads, cfg.text_mlp, cfg.norm_eps, cfg.attn_impl, cfg.gelu)
                                    for _ in range(cfg.text_depth))
        self.norm = RMSNorm(cfg.text_dim, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self):
        _normal_init(self)  # as the LM's, then:
        # Word embeddings at unit scale, not 0.02: at 0.02 the blocks' output swamps the words; directions get dropped
        nn.init.normal_(self.embed.weight, std=1.0)

    @staticmethod
    def split(prompt):
        return re.findall(r"[a-z0-9]+", prompt.lower())

    @staticmethod
    def build_vocab(captions):  # the sorted set of words in the training captions
        return sorted({w for c in captions for w in TextEncoder.split(c)})

    def get_extra_state(self):
        return list(self.words)

    def set_extra_state(self, words):
        if hasattr(self, "embed") and len(words) + 2 != self.embed.num_embeddings:
            raise ValueError(f"the checkpoint has {len(words)} words, this encoder {self.embed.num_embeddings - 2}: "
                             "build it as TextEncoder(cfg, state_dict['_extra_state'])")
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    def tokenize(self, prompts, strict=False):
        """list of B prompts -> ids (B, text_len), PAD after the last word. No truncation: a prompt longer
        than text_len words is an error. A word the encoder never saw is UNK, or with strict=True an error."""
        unknown = sorted({w for prompt in prompts for w in self.split(prompt)} - set(self.index))
        if strict and unknown:
            raise ValueError(f"the text encoder never saw {', '.join(unknown)}; "
                             f"the words it knows: {' '.join(self.words)}")
        ids = torch.full((len(prompts), self.cfg.text_len), self.PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = self.split(prompt)
            if not 1 <= len(words) <= self.cfg.text_len:
                raise ValueError(f"a prompt must have 1 to {self.cfg.text_len} words (text_len; longer prompts are "
                                 f"not truncated), got {len(words)} in {prompt!r}")
            ids[row, :len(words)] = torch.tensor([self.index.get(w, self.UNK) for w in words])
        return ids.to(self.embed.weight.device)

    def forward(self, ids):
        """ids (B, L) -> text features (B, L, text_dim), zero at PAD positions."""
        real = ids != self.PAD  # (B, L)
        cos, sin = _rope_table(ids.shape[1], self.cfg.text_dim // self.cfg.text_heads, self.cfg.rope_theta, ids.device)
        mask = real[:, None, None, :]  # (B, 1, 1, L): every position sees every word, no position sees a pad
        x = self.embed(ids)  # (B, L, text_dim)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x) * real[..., None]


class SemanticLM(nn.Module):
    """The LM without its (frozen, external) text encoder: token embedding, text MLP, learned null text
    vector, micro-condition MLPs, `depth` Llama blocks, final LayerNorm, untied head (tiny: + digit maps)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.embed = nn.Embedding(cfg.vocab_size, W)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, W), nn.GELU(approximate=cfg.gelu), nn.Linear(W, W))
        # CFG's unconditional text: a learned null vector in every projected text slot, as the release (DESIGN §4)
        self.null_text = nn.Parameter(torch.empty(W))
        self.micro = nn.ModuleDict({k: nn.Sequential(nn.Linear(cfg.micro_dim, cfg.micro_hidden), nn.SiLU(),
                                                     nn.Linear(cfg.micro_hidden, W)) for k in ("frames", "motion")})
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp, cfg.norm_eps, cfg.attn_impl, cfg.gelu) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, cfg.vocab_size, bias=False)
        self.register_buffer("digits", code_digits(cfg) if cfg.code_levels else None, persistent=False)  # (V, D_dig)
        if self.digits is not None:
            self.digits_in = nn.Linear(self.digits.shape[1], W, bias=False)
            self.digits_out = nn.Linear(W, self.digits.shape[1], bias=False)
        self._rope = None  # (cos, sin) table, grown on demand; not a buffer, so meta-safe and out of the state_dict
        self.initialize_weights()

    def initialize_weights(self):
        _normal_init(self)
        nn.init.normal_(self.null_text, std=self.cfg.width ** -0.5)  # the null text: randn(W) / sqrt(W), as the release
        # Zero-init each micro-condition MLP's last layer: the slots start as zeros, their influence is learned (DiT)
        for mlp in self.micro.values():
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def new_cache(self, batch, length):
        """An empty KV cache for `length` positions: (depth, 2, B, H, length, D), allocated once."""
        cfg = self.cfg
        weight = self.head.weight
        return torch.empty(cfg.depth, 2, batch, cfg.heads, length, cfg.width // cfg.heads, dtype=weight.dtype,
                           device=weight.device)

    def forward(self, x, cache=None, start=0):
        """x (B, N, W) input embeddings at positions start..start+N-1 -> logits (B, N, V).
        With a cache (new_cache) the positions before `start` come from it; without one, start is 0."""
        B, N, _ = x.shape
        end = start + N
        if self._rope is None or self._rope[0].shape[0] < end or self._rope[0].device != x.device:
            with torch.inference_mode(False):  # a plain tensor, usable by training after an inference_mode call
                self._rope = _rope_table(max(2 * end, 1024), self.cfg.width // self.cfg.heads, self.cfg.rope_theta,
                                         x.device)
        cos, sin = self._rope[0][start:end], self._rope[1][start:end]  # (N, D/2) each
        # causal mask, once for all blocks: query i (position start+i) sees keys j <= start+i; one new token, all
        mask = None if N == 1 else torch.ones(N, end, dtype=torch.bool, device=x.device).tril(start)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, None if cache is None else cache[i], start)
        h = self.norm(x)
        return self.head(h) if self.digits is None else self.head(h) + self.digits_out(h) @ self.digits.T.to(h.dtype)

    def embed_ids(self, ids):
        """ids (...) -> input vectors (..., W): the id's row of the table, plus its FSQ digits' map (code_levels)."""
        x = self.embed(ids)
        return x if self.digits is None else x + self.digits_in(self.digits[ids])

    def micro_embed(self, frames, motion):
        """frames, motion (B,) -> the two micro-condition slots (B, 2, W).

        The sinusoids turn 1 to 1e-4 rad per unit (made for DDPM steps 0..1000): raw scores 0.5..1.25 would
        turn a few channels by under a radian, so each value is mapped from its allowed range onto [0, 1000]."""
        cfg = self.cfg
        slots = []
        for name, value, lo, hi in (("frames", frames, 1, cfg.frames_max), ("motion", motion, 0.0, cfg.motion_max)):
            if ((value < lo) | (value > hi)).any():
                raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value.tolist()}")
            t = value.float() if cfg.micro_raw else 1000.0 * (value.float() - lo) / (hi - lo)  # (B,) in [0, 1000]
            slots.append(self.micro[name](timestep_embedding(t, cfg.micro_dim).to(self.head.weight.dtype)))
        return torch.stack(slots, dim=1)  # (B, 2, W)

    def prefix(self, text, frames, motion, keep=None):
        """Embeddings of [BOS][frames][motion][text x L][SOI]: (B, L + 4, W).

        text (B, L, text_dim) with 1 <= L <= text_len; frames, motion (B,) tensors or numbers;
        keep (B,) bool: where False the text slots hold the learned null vector instead (CFG)."""
        if text.dim() != 3 or text.shape[-1] != self.cfg.text_dim or not 1 <= text.shape[1] <= self.cfg.text_len:
            raise ValueError(f"text must be (B, L, {self.cfg.text_dim}) with 1 <= L <= text_len = {self.cfg.text_len}, "
                             f"got {tuple(text.shape)}")
        B = text.shape[0]
        frames = _per_sample(frames, "frames", B, text.device)
        motion = _per_sample(motion, "motion", B, text.device)
        txt = self.text_proj(text.to(self.head.weight.dtype))  # (B, L, W)
        if keep is not None:
            txt = torch.where(keep[:, None, None], txt, self.null_text)
        ends = self.embed(torch.tensor([self.cfg.BOS, self.cfg.SOI], device=text.device)).expand(B, 2, -1)  # (B, 2, W)
        return torch.cat([ends[:, :1], self.micro_embed(frames, motion), txt, ends[:, 1:]], dim=1)


def token_layout(cfg, n_segments, device=None):
    """The ids after the prefix's [SOI] for n_segments segments, -1 where a code goes: (S,) long.
    n_i codes [EOI] ([SOP] n_p codes [EOP]) x (frames-1), then [SOI] and the same per further
    segment, then [EOS]. The one place the stream's structure is written down."""
    # BEGIN SOLUTION lm_sequence: one segment is n_i codes, EOI, then (SOP, n_p codes, EOP) per later frame; SOI between segments, EOS at the end
    seg = [-1] * cfg.n_i + [cfg.EOI] + ([cfg.SOP] + [-1] * cfg.n_p + [cfg.EOP]) * (cfg.frames - 1)
    return torch.tensor(seg + ([cfg.SOI] + seg) * (n_segments - 1) + [cfg.EOS], device=device)
    # END SOLUTION


# ---------------------------------------------------------------------------- loss
def lm_loss(model, codes, text, frames, motion):
    """Next-token cross-entropy on SOI and every id after it (codes and structure tokens), none on
    the prefix -> one scalar. codes (B, n_seg * tokens_per_segment); text (B, L, text_dim); frames, motion
    (B,). In training mode each sample's text is replaced by the null vector with p = cfg.p_uncond."""
    cfg = model.cfg
    B = codes.shape[0]
    layout = token_layout(cfg, _check_codes(cfg, codes, "codes"), codes.device)  # (S,)
    tokens = layout.expand(B, -1).clone()
    tokens[:, layout < 0] = codes  # (B, S): the full stream after the first SOI
    keep = torch.rand(B, device=codes.device) >= cfg.p_uncond if model.training else None
    prefix = model.prefix(text, frames, motion, keep)  # (B, P, W), ends with SOI
    n_prefix = prefix.shape[1]
    # BEGIN SOLUTION lm_sequence: input = prefix + embedded tokens except the last; the logit at position i predicts id i+1, from the one before SOI on
    x = torch.cat([prefix, model.embed_ids(tokens[:, :-1])], dim=1)  # (B, n_prefix + S - 1, W): EOS is only a target
    logits = model(x)[:, n_prefix - 2:]  # (B, S + 1, V): the predictions of SOI and of every id after it
    targets = torch.cat([torch.full_like(tokens[:, :1], cfg.SOI), tokens], dim=1)  # (B, S + 1)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    # END SOLUTION


# ---------------------------------------------------------------------------- sampling
def _pick(logits, guidance, temperature, top_k, top_p, generator):
    """One code id per row from the logits (rows, V), restricted to the codebook by the caller."""
    # BEGIN SOLUTION lm_sampling: CFG u + guidance (c - u) on the two halves of the rows; greedy at temperature 0; top-k, then top-p on the sorted probabilities; multinomial
    if guidance != 1.0:  # CFG on logits, before temperature: u + guidance (c - u)
        cond, uncond = logits.chunk(2)
        logits = uncond + guidance * (cond - uncond)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]  # (rows, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None:  # nucleus: keep the most likely ids until their mass reaches top_p
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # drop ids whose predecessors already hold top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # END SOLUTION


@torch.no_grad()
def generate(model, text, frames, motion, n_segments=1, guidance=1.0, temperature=1.0, top_k=None, top_p=None,
             generator=None, prefix_codes=None, use_cache=True, progress=None):
    """Write n_segments more segments -> their codes (B, n_segments * tokens_per_segment - started).

    Prefill the prefix and prefix_codes (the stream so far: earlier segments, perhaps the first `started` codes
    of the next), then one id per step: structure tokens forced where the layout puts them, codebook ids drawn
    elsewhere (greedy at temperature 0). guidance != 1 runs conditional and null-text rows (at cfg.null_motion if
    set) in one batch. use_cache=False recomputes the whole sequence every step (a check: same tokens for the
    same generator); progress(i, n) is called after step i of n."""
    cfg = model.cfg
    B = text.shape[0]
    device = text.device
    n_old = _check_sampling(cfg, B, n_segments, guidance, temperature, top_k, top_p, prefix_codes)  # codes given
    layout = token_layout(cfg, n_old // cfg.tokens_per_segment + n_segments, device)[:-1]  # EOS is never an input
    plan = layout.tolist()
    seq = layout.expand(B, -1).clone()  # (B, S), filled in as we go
    known = int((layout < 0).nonzero()[n_old])  # the stream up to the first code to draw
    if n_old:
        seq[:, :known][:, layout[:known] < 0] = prefix_codes

    copies = 1 if guidance == 1.0 else 2  # CFG: each row twice, the second with the null text
    x = model.prefix(text, frames, motion)  # (B, P, W)
    if copies == 2:
        null_motion = motion if cfg.null_motion is None else cfg.null_motion
        x = torch.cat([x, model.prefix(text, frames, null_motion, torch.zeros(B, dtype=torch.bool, device=device))])
    x = torch.cat([x, model.embed_ids(seq[:, :known].repeat(copies, 1))], dim=1)  # (copies * B, P + known, W)
    start = x.shape[1]
    cache = model.new_cache(x.shape[0], start + len(plan) - known) if use_cache else None
    logits = model(x, cache)[:, -1]  # (copies * B, V)
    for i in range(known, len(plan)):
        if plan[i] < 0:
            seq[:, i] = _pick(logits[:, :cfg.codebook_size].float(), guidance, temperature, top_k, top_p, generator)
        if progress is not None:
            progress(i + 1 - known, len(plan) - known)
        if i + 1 == len(plan):
            break
        latest = model.embed_ids(seq[:, i:i + 1].repeat(copies, 1))  # (copies * B, 1, W): the id just fixed
        if use_cache:
            logits = model(latest, cache, start + i - known)[:, -1]
        else:
            x = torch.cat([x, latest], dim=1)
            logits = model(x)[:, -1]
    return seq[:, known:][:, layout[known:] < 0]  # (B, n_segments * tokens_per_segment)


# ---------------------------------------------------------------------------- checks
def _per_sample(v, name, B, device):  # a number or a (B,) tensor -> (B,) tensor
    v = torch.as_tensor(v, device=device)
    if v.shape not in ((), (B,)):
        raise ValueError(f"{name} must be a number or a ({B},) tensor (one per sample), got shape {tuple(v.shape)}")
    return v.expand(B)


def _check_codes(cfg, codes, what, whole=True):
    """-> the number of segments in codes (B, n_segments * tokens_per_segment); whole=False: any length."""
    per_segment = cfg.tokens_per_segment
    if codes.dim() != 2 or codes.shape[1] == 0 or whole and codes.shape[1] % per_segment:
        raise ValueError(f"{what} must be (B, n_segments * tokens_per_segment) with tokens_per_segment = "
                         f"{per_segment}, got {tuple(codes.shape)}")
    if codes.min() < 0 or codes.max() >= cfg.codebook_size:
        raise ValueError(f"{what} must be codebook ids in [0, {cfg.codebook_size}), got [{codes.min()}, {codes.max()}]")
    return codes.shape[1] // per_segment


def _check_sampling(cfg, B, n_segments, guidance, temperature, top_k, top_p, prefix_codes):  # -> codes in prefix_codes
    if not (isinstance(n_segments, int) and n_segments >= 1):
        raise ValueError(f"n_segments must be an int >= 1, got {n_segments!r}")
    if temperature < 0 or guidance < 0:
        raise ValueError(f"temperature and guidance must be >= 0, got {temperature}, {guidance}")
    if (top_k is not None and not (isinstance(top_k, int) and top_k >= 1)
            or top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"top_k must be None or an int >= 1, and top_p None or in (0, 1]; got {top_k!r}, {top_p}")
    if prefix_codes is None:
        return 0
    if prefix_codes.shape[0] != B:
        raise ValueError(f"prefix_codes must have batch size {B} like text, got {prefix_codes.shape[0]}")
    _check_codes(cfg, prefix_codes, "prefix_codes", whole=False)
    return prefix_codes.shape[1]


# ---------------------------------------------------------------------------- demo
if __name__ == "__main__":  # each preset's size (tests/test_lm.py trains and samples the tiny LM)
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = SemanticLM(preset)
        print(f"{name}: SemanticLM {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{preset.tokens_per_segment:,} codes per segment, vocabulary {preset.vocab_size:,}")
