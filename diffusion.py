"""diffusion.py: the diffusion stage of LanDiff — a CogVideoX DiT, a ControlNet branch that
injects the LM's coarse semantics, and rectified-flow training and sampling.

The idea (LanDiff): the language model has already decided *what* happens (semantic features); a
video diffusion model only has to render the details. A frozen text-to-video DiT is steered by a
trainable copy of its first blocks (ControlNet) that also sees the semantic features, upsampled and
added to its noisy latent. Windows of latent frames are generated one after another, each starting
from a clean prefix (the last frames of the previous window), so long videos stream without a seam.

    semantic features ─ upsampler ─ zero conv ─┐
    noisy latent ──────────────────────────────+─ ControlNet blocks ─ zero linears ─┐
    noisy latent, text, t ─ DiT blocks (block i + control i) ─────────────────────────┴─ v

Time convention: x_t = (1 − t)·x0 + t·ε with t ∈ [0, 1] (t = 1 is pure noise), the network
predicts v = ε − x0, so dx/dt = v and Euler steps run from t = 1 down to 0; the network is
fed 1000·t, the DDPM timestep range its CogVideoX peer was trained on.

Shapes: B batch, C latent channels, T latent frames, H×W latent size, p patch,
N = T·(H/p)·(W/p) video tokens, L text tokens, S = L + N, D width, h×w semantic grid.
latents (B, C, T, H, W) (the VAE's layout); text (B, L, text_dim); t (B,);
semantic features (B, T, sem_dim, h, w); hidden states [text; video] (B, S, D).

References: LanDiff, Yin et al. 2025, arXiv 2503.04606; CogVideoX, arXiv 2408.06072 (expert
adaLN, 3D sin-cos positions, q/k LayerNorm); DiT, arXiv 2212.09748 (adaLN-Zero); ControlNet,
arXiv 2302.05543 (zero convolutions); rectified flow, arXiv 2209.03003, and flow matching,
arXiv 2210.02747; SD3, arXiv 2403.03206 (logit-normal timesteps, resolution shift).

Deliberately different from the release (docs/DESIGN.md §0): rectified flow, Euler and plain CFG
(a v-prediction model is a flow model in disguise: release.VPrediction samples the release's weights
with the same loop); the ControlNet branch has no final layer and is called once per step as a
function. The base DiT is computationally identical to diffusers' CogVideoXTransformer3DModel at the
CogVideoX-2B config (weights map one to one; the patch conv becomes a linear on patches).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiffusionConfig:
    latent_ch: int = 8          # VAE latent channels
    frames: int = 5             # latent frames per window
    lat_h: int = 8              # latent height
    lat_w: int = 8              # latent width
    patch: int = 2              # p×p patches per frame, as CogVideoX
    width: int = 128            # D
    depth: int = 4              # DiT blocks
    heads: int = 4
    mlp: int = 512              # MLP hidden width (4·D)
    text_dim: int = 128         # text encoder width
    text_len: int = 8           # text tokens L (padded with zero vectors)
    time_dim: int = 128         # time embedding width (the adaLN input)
    control_depth: int = 2      # DiT blocks copied into the ControlNet branch
    sem_dim: int = 192          # semantic feature width (the tokenizer's)
    sem_ch: int = 64            # upsampler output channels (release 64)
    sem_up: int = 1             # pixel-shuffle ×2 stages from the semantic grid to the latent grid
    up_ch: int = 32             # upsampler width (release 512)
    up_blocks: int = 1          # ResNet blocks per upsampler level (release 4 + 1)
    prefix: int = 3             # clean streaming prefix, in latent frames
    shift: float = 1.0          # resolution shift of the timestep distribution (SD3)
    prediction: str = "velocity"  # what the network predicts: "velocity" (ours, flow matching), fed 1000·t,
                                  # or "v" (the release's zero-SNR DDPM), fed its integer step (release.py)
    p_uncond: float = 0.1       # probability of dropping the text in training, for CFG
    attn_impl: str = "sdpa"     # "sdpa" | "manual"
    gelu: str = "none"          # the MLP's GELU: "tanh" (CogVideoX's form) or "none" (exact: within 5e-4, a faster CPU kernel)

    def __post_init__(self):
        if self.attn_impl not in ("sdpa", "manual") or self.gelu not in ("none", "tanh"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'manual' and gelu 'none' or 'tanh', got {self.attn_impl!r}, {self.gelu!r}")
        if self.width % self.heads or self.width % 16:
            raise ValueError(f"width must be a multiple of heads ({self.heads}) and 16 (3D sin-cos), got {self.width}")
        multiple = math.lcm(self.patch, 2 ** self.sem_up)  # whole patches, and the upsampler's ×2 stages
        if self.lat_h % multiple or self.lat_w % multiple:
            raise ValueError(f"lat_h and lat_w must be multiples of patch ({self.patch}) and of 2^sem_up "
                             f"({2 ** self.sem_up}), got {self.lat_h}×{self.lat_w}")
        if not (0 <= self.control_depth <= self.depth and 0 <= self.prefix < self.frames):
            raise ValueError(f"control_depth must be in 0..depth (0..{self.depth}) and prefix in 0..frames-1 "
                             f"(0..{self.frames - 1}), got {self.control_depth}, {self.prefix}")
        levels = (self.up_ch, self.up_ch // 4) if self.sem_up else (self.up_ch,)  # a pixel shuffle: c -> c/4
        if self.up_ch % 4 or any(c >= 32 and c % 32 for c in levels) or self.up_blocks < 1:
            raise ValueError(f"up_ch must be a multiple of 4 whose levels (up_ch, up_ch/4 if sem_up) are under 32 or "
                             f"multiples of 32 (GroupNorm(32)), up_blocks ≥ 1; got {self.up_ch}, {self.up_blocks}")
        if self.shift <= 0 or not 0 <= self.p_uncond < 1 or self.prediction not in ("velocity", "v"):
            raise ValueError(f"shift must be > 0, p_uncond in [0, 1) and prediction 'velocity' or 'v', got "
                             f"{self.shift}, {self.p_uncond}, {self.prediction!r}")

    @property
    def grid(self):  # video tokens per axis (T, H/p, W/p)
        return self.frames, self.lat_h // self.patch, self.lat_w // self.patch

    @property
    def tokens(self):  # N video tokens
        return math.prod(self.grid)

    @property
    def seq(self):  # S = L + N tokens in the joint attention
        return self.text_len + self.tokens

    @property
    def sem_hw(self):  # semantic grid (h, w) that the upsampler brings to (lat_h, lat_w)
        return self.lat_h // 2 ** self.sem_up, self.lat_w // 2 ** self.sem_up


PRESETS = {
    # DiT 1.68 M; ControlNet 0.88 M (2 blocks, embeddings, zero linears) + upsampler 0.13 M; 80 video tokens
    "tiny": DiffusionConfig(),
    # DiT 1,693,783,872 (= CogVideoX-2B); ControlNet 905.76 M + upsampler 39.25 M = 945.01 M
    "full": DiffusionConfig(latent_ch=16, frames=13, lat_h=60, lat_w=90, patch=2, width=1920, depth=30,
                            heads=30, mlp=7680, text_dim=4096, text_len=226, time_dim=512, control_depth=15,
                            sem_dim=768, sem_ch=64, sem_up=1, up_ch=512, up_blocks=5, prefix=7, shift=3.0, gelu="tanh"),
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
def sincos_3d(T, h, w, dim, device, space_scale=1.875):
    """CogVideoX's fixed 3D sin-cos positions (N, dim) in token order (t, row, col):
    [time (dim/4) | column (3·dim/8) | row (3·dim/8)], each block [sin | cos] with
    frequencies 10000^(-i/half). Space is divided by 1.875 (CogVideoX's interpolation scale:
    its 2B model was trained on a 30×45 token grid); text tokens get no position."""
    f64 = torch.float64 if device.type != "mps" else torch.float32  # MPS has no float64

    def sincos(pos, d):  # pos (N,) -> (N, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=f64, device=device) / (d / 2))
        out = pos.to(f64)[:, None] * omega[None]  # (N, d/2)
        return torch.cat([out.sin(), out.cos()], dim=1)

    frame = torch.arange(T, dtype=torch.float32, device=device)
    row = torch.arange(h, dtype=torch.float32, device=device) / space_scale
    col = torch.arange(w, dtype=torch.float32, device=device) / space_scale
    frame, row, col = torch.meshgrid(frame, row, col, indexing="ij")  # (T, h, w) each
    d = 3 * dim // 8
    return torch.cat([sincos(frame.flatten(), dim // 4), sincos(col.flatten(), d), sincos(row.flatten(), d)], dim=1)


def patchify(x, p):
    """(B, C, T, H, W) -> (B, N, C·p·p): one token per p×p patch of each frame, (t, row, col) order."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // p, p, W // p, p)  # (B, C, T, h, p, w, p); reshape: frame slices are welcome
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * (H // p) * (W // p), C * p * p)  # (B, N, C·p·p)


def unpatchify(y, cfg):
    """(B, N, C·p·p) -> (B, C, T, H, W): the inverse of patchify."""
    (T, h, w), p = cfg.grid, cfg.patch
    y = y.view(y.shape[0], T, h, w, cfg.latent_ch, p, p)  # (B, T, h, w, C, p, p)
    return y.permute(0, 4, 1, 2, 5, 3, 6).reshape(y.shape[0], cfg.latent_ch, T, h * p, w * p)  # (B, C, T, H, W)


class Embed(nn.Module):
    """Latents -> video tokens with positions, text -> text tokens, t -> time embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Linear(cfg.latent_ch * cfg.patch**2, cfg.width)  # = CogVideoX's p×p stride-p conv per frame
        self.text = nn.Linear(cfg.text_dim, cfg.width)
        self.time1 = nn.Linear(cfg.width, cfg.time_dim)  # sinusoids of width D -> MLP, as CogVideoX
        self.time2 = nn.Linear(cfg.time_dim, cfg.time_dim)
        self._pos = {}  # (device, dtype) -> (N, D); built on first use, so meta construction stays free

    def forward(self, x, t, text):
        key = (x.device, x.dtype)
        if key not in self._pos:
            self._pos[key] = sincos_3d(*self.cfg.grid, self.cfg.width, x.device).to(x.dtype)
        vid = self.patch(patchify(x, self.cfg.patch)) + self._pos[key]  # (B, N, D)
        time = t.float() if self.cfg.prediction == "v" else 1000 * t.float()  # DDPM's 0..1000 range, fp32
        emb = timestep_embedding(time, self.cfg.width).to(x.dtype)  # (B, D)
        return self.text(text), vid, self.time2(F.silu(self.time1(emb)))  # (B, L, D), (B, N, D), (B, time_dim)


def expert_adaln(norm, ada, emb, txt, vid):
    """CogVideoX's "expert" adaLN: one LayerNorm, but separate shift/scale/gate for text and video
    tokens, all six made from the time embedding by one linear."""
    # BEGIN SOLUTION expert_adaln: six (B, 1, D) vectors from ada(silu(emb)): shift, scale, gate for video, then for text; modulate norm(x) * (1 + scale) + shift
    shift, scale, gate, t_shift, t_scale, t_gate = ada(F.silu(emb))[:, None].chunk(6, dim=-1)  # each (B, 1, D)
    return norm(txt) * (1 + t_scale) + t_shift, norm(vid) * (1 + scale) + shift, t_gate, gate
    # END SOLUTION


class Block(nn.Module):
    """One CogVideoX block: expert adaLN, joint attention over [text; video], expert adaLN, MLP."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.heads = cfg.heads
        self.impl = cfg.attn_impl
        self.gelu = cfg.gelu
        self.norm1 = nn.LayerNorm(D)
        self.ada1 = nn.Linear(cfg.time_dim, 6 * D)  # attention's adaLN: shift, scale, gate for video and for text
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))  # the four projections
        # LayerNorm on q and k per head keeps attention logits bounded in a deep bf16 model
        self.q_norm, self.k_norm = (nn.LayerNorm(D // cfg.heads, eps=1e-6) for _ in range(2))
        self.norm2 = nn.LayerNorm(D)
        self.ada2 = nn.Linear(cfg.time_dim, 6 * D)  # the MLP's adaLN
        self.fc1 = nn.Linear(D, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, D)

    def forward(self, txt, vid, emb):
        L = txt.shape[1]
        h_txt, h_vid, g_txt, g_vid = expert_adaln(self.norm1, self.ada1, emb, txt, vid)
        h = torch.cat([h_txt, h_vid], dim=1)  # (B, S, D): one joint sequence, text first
        B, S, D = h.shape
        q, k, v = (f(h).view(B, S, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, S, d)
        a = attention(self.q_norm(q), self.k_norm(k), v, impl=self.impl)  # (B, H, S, d); no mask: all see all
        a = self.out(a.transpose(1, 2).reshape(B, S, D))  # (B, S, D)
        txt, vid = txt + g_txt * a[:, :L], vid + g_vid * a[:, L:]
        h_txt, h_vid, g_txt, g_vid = expert_adaln(self.norm2, self.ada2, emb, txt, vid)
        m = self.fc2(F.gelu(self.fc1(torch.cat([h_txt, h_vid], dim=1)), approximate=self.gelu))  # (B, S, D)
        return txt + g_txt * m[:, :L], vid + g_vid * m[:, L:]


def group_norm(c):
    """VQGAN's GroupNorm(32); a tiny upsampler with fewer than 32 channels gets one group per channel."""
    return nn.GroupNorm(min(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    """VQGAN ResNet block: (GroupNorm, SiLU, 3×3 conv) twice, 1×1 shortcut when the width changes."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def semantic_upsampler(cfg):
    """Per-frame (sem_dim, h, w) -> (sem_ch, lat_h, lat_w), the release's VQGAN decoder without attention:
    conv in, 2 middle blocks, per ×2 stage up_blocks ResNet blocks then a pixel shuffle (c -> c/4
    channels, 2× size) and a conv back to c; the full-resolution level runs at c/4 when there was a
    stage (release ch_mult (0.25, 1)); GroupNorm, SiLU, conv out."""
    c = cfg.up_ch
    layers = [nn.Conv2d(cfg.sem_dim, c, 3, padding=1), ResBlock(c, c), ResBlock(c, c)]
    for _ in range(cfg.sem_up):
        layers += [ResBlock(c, c) for _ in range(cfg.up_blocks)]
        layers += [nn.PixelShuffle(2), nn.Conv2d(c // 4, c, 3, padding=1)]  # (c, h, w) -> (c/4, 2h, 2w) -> (c, 2h, 2w)
    c_out = c // 4 if cfg.sem_up else c
    layers += [ResBlock(c, c_out)] + [ResBlock(c_out, c_out) for _ in range(cfg.up_blocks - 1)]
    layers += [group_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, cfg.sem_ch, 3, padding=1)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- the models
def _default_init(model):
    """The default init of DiT and ControlNet (DiT's initialize_weights): Xavier-uniform linears with zero
    biases; the time MLP N(0, 0.02)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.embed.time1.weight, std=0.02)
    nn.init.normal_(model.embed.time2.weight, std=0.02)


def _zero(*modules):
    for module in modules:
        for p in module.parameters():
            nn.init.zeros_(p)


class DiT(nn.Module):
    """The base text-to-video DiT (CogVideoX-2B shape). forward(x, t, text, control) -> v, same shape as x;
    control[i] (B, S, D), from ControlNet, is added to all tokens after block i."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_final = nn.LayerNorm(cfg.width)
        self.norm_out = nn.LayerNorm(cfg.width)
        self.ada_out = nn.Linear(cfg.time_dim, 2 * cfg.width)  # final adaLN: shift, scale
        self.proj_out = nn.Linear(cfg.width, cfg.patch**2 * cfg.latent_ch)
        self.initialize_weights()

    def initialize_weights(self):
        """Every initialisation of the DiT, DiT-style: the defaults, then each zero-init with its reason."""
        _default_init(self)
        # adaLN-Zero (DiT): each block's shift, scale and gate start at 0, so every block starts as the identity
        for block in self.blocks:
            _zero(block.ada1, block.ada2)
        # the final adaLN and output projection start at 0: an untrained DiT predicts v = 0
        _zero(self.ada_out, self.proj_out)

    def forward(self, x, t, text, control=None):
        _check(self.cfg, x, t, text)
        if control is not None and len(control) > self.cfg.depth:
            raise ValueError(f"control has {len(control)} residuals, the DiT has only {self.cfg.depth} blocks")
        L = text.shape[1]
        txt, vid, emb = self.embed(x, t, text)  # (B, L, D), (B, N, D), (B, time_dim)
        for i, block in enumerate(self.blocks):
            txt, vid = block(txt, vid, emb)
            if control is not None and i < len(control):
                # BEGIN SOLUTION controlnet: add control[i] to the text tokens (its first L) and the video tokens (the rest)
                txt, vid = txt + control[i][:, :L], vid + control[i][:, L:]  # all tokens, as the release
                # END SOLUTION
        shift, scale = self.ada_out(F.silu(emb))[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        vid = self.norm_out(self.norm_final(vid)) * (1 + scale) + shift  # CogVideoX normalises twice
        return unpatchify(self.proj_out(vid), self.cfg)  # (B, N, p·p·C) -> (B, C, T, H, W)


class ControlNet(nn.Module):
    """The trainable branch: its own embeddings and control_depth blocks (copies of the base's first
    blocks, see from_dit), a zero linear Z_i after block i, and the semantic path. forward(x, t, text, sem)
    -> [Z_0, …, Z_{K-1}] outputs, each (B, S, D): Z_i feeds control block i+1 and is base block i's residual."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.control_depth))
        self.zero = nn.ModuleList(nn.Linear(cfg.width, cfg.width, bias=False) for _ in range(cfg.control_depth))
        self.upsampler = semantic_upsampler(cfg)
        self.hint_out = nn.Conv2d(cfg.sem_ch, cfg.latent_ch, 3, padding=1)  # ControlNet's zero conv
        self.initialize_weights()

    def initialize_weights(self):
        """As DiT's (the upsampler's convolutions keep PyTorch's init); from_dit then copies the base in."""
        _default_init(self)
        # adaLN-Zero, as in the base: each block starts as the identity
        for block in self.blocks:
            _zero(block.ada1, block.ada2)
        # ControlNet's zero linears and zero conv: the fresh branch adds exactly 0 to the base
        _zero(*self.zero, self.hint_out)

    @classmethod
    def from_dit(cls, dit):
        """A branch that starts as a copy of the base's embeddings and first blocks (ControlNet)."""
        ref = next(dit.parameters())
        net = cls(dit.cfg).to(ref.device, ref.dtype)
        net.embed.load_state_dict(dit.embed.state_dict())
        for mine, theirs in zip(net.blocks, dit.blocks):
            mine.load_state_dict(theirs.state_dict())
        return net

    def hint(self, sem):
        """Semantic features (B, T, sem_dim, h, w) -> the map added to the noisy latent, (B, C, T, H, W)."""
        B, T = sem.shape[:2]
        s = self.hint_out(self.upsampler(sem.flatten(0, 1)))  # (B·T, C, H, W): frame by frame, as the release
        return s.view(B, T, *s.shape[1:]).transpose(1, 2)  # (B, C, T, H, W)

    def forward(self, x, t, text, sem=None, hint=None):
        """hint = self.hint(sem) may be passed instead of sem (euler_sample computes it once)."""
        _check(self.cfg, x, t, text, sem)
        if (sem is None) == (hint is None):
            raise ValueError("pass exactly one of sem (B, frames, sem_dim, h, w) and hint (B, C, T, H, W)")
        hint = self.hint(sem) if hint is None else hint
        L = text.shape[1]
        txt, vid, emb = self.embed(x + hint, t, text)
        # BEGIN SOLUTION controlnet: per block: h = zero(cat(block(txt, vid, emb))); collect h; h split at L feeds the next block
        outs = []
        for block, zero in zip(self.blocks, self.zero):
            h = zero(torch.cat(block(txt, vid, emb), dim=1))  # (B, S, D)
            outs.append(h)
            txt, vid = h[:, :L], h[:, L:]  # the zero linear's output is the next block's input (release)
        return outs
        # END SOLUTION


# ---------------------------------------------------------------------------- loss
def _draw(fn, shape, generator, device):
    """torch.randn/rand on the generator's device (so a CPU generator works with CUDA data), then moved."""
    return fn(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


def shift_time(t, shift):
    """SD3's resolution shift t -> shift·t / (1 + (shift − 1)·t): it moves times towards the noise end,
    because more pixels (tokens) keep more signal at the same noise level. Training and sampling both use it."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n, shift=1.0, generator=None, device=None):
    """n training times (fp32): logit-normal t = sigmoid(u), u ~ N(0, 1), which favours the middle of the
    path (SD3), then shifted (shift_time)."""
    # BEGIN SOLUTION flow_matching: t = sigmoid(u), u drawn with _draw(torch.randn, ...); then shift_time
    return shift_time(torch.sigmoid(_draw(torch.randn, (n,), generator, device)), shift)
    # END SOLUTION


def fm_loss(dit, x0, text, controlnet=None, sem=None, prefix=0, generator=None):
    """Flow-matching loss ‖model(x_t, t) − (ε − x0)‖² -> one scalar (time convention: module docstring). In
    training mode (of the trained model: the branch if given, else the DiT) each sample's text is replaced by
    the unconditional text with probability cfg.p_uncond, for CFG. prefix > 0 holds the first prefix latent
    frames clean (x_t = x0 there) and leaves them out of the loss: the streaming continuation task. To train
    only the branch, freeze the base first with dit.requires_grad_(False): gradients still flow through it."""
    cfg = dit.cfg
    _check_method(cfg, controlnet, sem, prefix)
    B = x0.shape[0]
    # BEGIN SOLUTION flow_matching: draw t (sample_t), then noise (_draw, same generator, in that order); x_t = (1 - t) x0 + t noise, clean prefix; text dropout; MSE to noise - x0 past the prefix
    t = sample_t(B, cfg.shift, generator, x0.device)  # (B,), fp32: the time embedding sees it unrounded
    noise = _draw(torch.randn, x0.shape, generator, x0.device).to(x0.dtype)  # (B, C, T, H, W)
    t_frames = t.view(B, 1, 1, 1, 1)
    xt = ((1 - t_frames) * x0 + t_frames * noise).to(x0.dtype)
    xt[:, :, :prefix] = x0[:, :, :prefix]  # streaming: continue from clean frames
    if (controlnet if controlnet is not None else dit).training and cfg.p_uncond > 0:
        drop = _draw(torch.rand, (B,), generator, x0.device) < cfg.p_uncond
        # The unconditional text is all zeros. CogVideoX's is the T5 encoding of the empty prompt; the tiny
        # text encoder reads 1 to 8 words, not none, so zeros stand in for it. The LM's unconditional text
        # is a learned null vector instead (lm.py, the release LM).
        text = text.masked_fill(drop[:, None, None], 0.0)
    control = controlnet(xt, t, text, sem) if controlnet is not None else None
    v = dit(xt, t, text, control)
    return F.mse_loss(v[:, :, prefix:], (noise - x0)[:, :, prefix:])
    # END SOLUTION


# ---------------------------------------------------------------------------- sampling
def _twice(x):
    """The batch twice, for the conditional and unconditional rows of CFG (None stays None)."""
    return None if x is None else torch.cat([x, x])


@torch.no_grad()
def euler_sample(dit, noise, text, steps=25, guidance=1.0, controlnet=None, sem=None, prefix=None, progress=None,
                 parameterization=None):
    """Integrate dx/dt = v from t = 1 (noise) to 0 in `steps` Euler steps on the shifted time grid.
    CFG on v: v_u + guidance·(v_c − v_u), conditional and unconditional (zero text as in fm_loss, the same
    semantics) rows in one batch. prefix (B, C, p, H, W): clean latent frames written into the first p
    frames before every model call and into the result (streaming). progress(i, steps) is called after
    step i (1-based), e.g. to move a bar. The times stay fp32 whatever the model's dtype. parameterization
    samples a DiT that is not a flow model (prediction="v", the release's: release.VPrediction) with its
    own time grid flow_times(steps), velocity (network, x, t) -> dx/dt and clean_state(prefix, t)."""
    B = noise.shape[0]
    n_prefix = 0 if prefix is None else prefix.shape[2]
    _check_method(dit.cfg, controlnet, sem, n_prefix, steps, guidance, noise, prefix, parameterization)
    hint = controlnet.hint(sem) if controlnet is not None else None  # the semantics do not change over steps
    times = shift_time(torch.linspace(1, 0, steps + 1, device=noise.device), dit.cfg.shift)  # (steps + 1,) fp32
    if parameterization is not None:
        times = parameterization.flow_times(steps).to(noise.device)  # e.g. the release's DDPM steps, as flow times

    def velocity(x, t, text, hint):  # dx/dt: the networks' output, or that output read by the parameterization
        def network(x_in, t_in):  # the DiT (steered by the branch) on these rows' text and hint
            control = controlnet(x_in, t_in, text, hint=hint) if controlnet is not None else None
            return dit(x_in, t_in, text, control)
        return network(x, t) if parameterization is None else parameterization(network, x, t)

    x = noise.clone()
    for i in range(steps):
        if n_prefix:
            # BEGIN SOLUTION streaming: overwrite the first n_prefix latent frames with the clean prefix
            # (a parameterization may hold it in a state of its own: its clean_state)
            x[:, :, :n_prefix] = prefix if parameterization is None else parameterization.clean_state(prefix, times[i])
            # END SOLUTION
        # BEGIN SOLUTION euler: v at t = times[i] (CFG: one batch of conditional and zero-text rows, v_u + guidance (v_c - v_u)); x += (times[i+1] - times[i]) v
        t = times[i].expand(B)  # (B,) fp32
        if guidance == 1:
            v = velocity(x, t, text, hint)
        else:
            v_c, v_u = velocity(_twice(x), _twice(t), torch.cat([text, torch.zeros_like(text)]), _twice(hint)).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (times[i + 1] - times[i]) * v
        # END SOLUTION
        if progress is not None:
            progress(i + 1, steps)
    if n_prefix:
        # BEGIN SOLUTION streaming: the result keeps the clean prefix too
        x[:, :, :n_prefix] = prefix
        # END SOLUTION
    return x


# ---------------------------------------------------------------------------- checks
def _check_method(cfg, controlnet, sem, n_prefix, steps=1, guidance=1.0, noise=None, prefix=None,
                  parameterization=None):
    """The arguments of fm_loss and euler_sample."""
    if (cfg.prediction == "v") != (parameterization is not None):  # fm_loss passes none: it trains flow models
        raise ValueError(f"a DiT with prediction='v' (the release's) only samples, through euler_sample's "
                         f"parameterization (release.VPrediction); a 'velocity' DiT takes none; got {cfg.prediction!r}")
    if (controlnet is None) != (sem is None):
        raise ValueError("pass controlnet and sem together (or neither)")
    if not 0 <= n_prefix < cfg.frames:
        raise ValueError(f"prefix must be in 0..frames-1 (0..{cfg.frames - 1}), got {n_prefix}")
    if not (isinstance(steps, int) and steps >= 1) or guidance < 0:
        raise ValueError(f"steps must be an int >= 1 and guidance >= 0 (1: none), got {steps!r}, {guidance}")
    if prefix is not None and (prefix.dim() != 5 or not n_prefix
                               or prefix.shape[:2] + prefix.shape[3:] != noise.shape[:2] + noise.shape[3:]):
        raise ValueError(f"prefix must be (B, C, p, H, W) = {(*noise.shape[:2], 'p', *noise.shape[3:])} with "
                         f"0 < p < frames ({cfg.frames}), got {tuple(prefix.shape)}")


def _check(cfg, x, t, text, sem=None):
    """Raise a ValueError that says what fits, before torch fails somewhere deep inside."""
    want = (cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w)
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"latents must be (B, latent_ch, frames, lat_h, lat_w) = (B, {', '.join(map(str, want))}), "
                         f"got {tuple(x.shape)}; other sizes need dataclasses.replace(cfg, frames=…, …)")
    B = x.shape[0]
    if t.shape != (B,):
        raise ValueError(f"t must be (B,) = ({B},) floats in [0, 1], got {tuple(t.shape)}")
    if tuple(text.shape) != (B, cfg.text_len, cfg.text_dim):
        raise ValueError(f"text must be (B, text_len, text_dim) = ({B}, {cfg.text_len}, {cfg.text_dim}) "
                         f"(pad with zero vectors), got {tuple(text.shape)}")
    if sem is not None and tuple(sem.shape) != (B, cfg.frames, cfg.sem_dim, *cfg.sem_hw):
        raise ValueError(f"semantic features must be (B, frames, sem_dim, h, w) = ({B}, {cfg.frames}, {cfg.sem_dim}, "
                         f"{cfg.sem_hw[0]}, {cfg.sem_hw[1]}), got {tuple(sem.shape)}")


# ---------------------------------------------------------------------------- demo
if __name__ == "__main__":  # each preset's size (tests/test_diffusion.py runs the models, sample.py the sampler)
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            models = {"DiT": DiT(preset), "ControlNet": ControlNet(preset)}
        counts = ", ".join(f"{k} {sum(p.numel() for p in m.parameters()):,}" for k, m in models.items())
        print(f"{name}: {counts} parameters; {preset.tokens:,} video + {preset.text_len} text tokens")
