"""vae.py: the 3D causal VAE of CogVideoX, which LanDiff uses to turn video into latents and back.

The idea. A video is far too large for a diffusion model to work on pixel by
pixel, so a variational autoencoder squeezes it first: 8x in space and 4x in
time at full size, 49x480x720 RGB frames -> 13x60x90 latents of 16 channels.
Every convolution is causal in time (it looks only at the current and the two
previous frames), so the first frame is encoded on its own, like an image, and
each later latent frame summarises the next 4 RGB frames: T = 1+4k frames <->
1+k latent frames, latent k covering RGB frames 4k-3..4k (so latent k depends on
frames <= 4k only, and RGB frame 4k on latents <= k only). The decoder's norms
are conditioned on the latent itself (SpatialNorm), and because nothing looks
ahead in time the decoder can run
chunk by chunk, carrying the last two input frames of every causal conv over to
the next chunk; that is how a long clip decodes in bounded memory.

Pipeline: video (B,3,T,H,W) -> Encoder -> mean, logvar (B,z,1+(T-1)/4,H/f,W/f)
          -> z = mean + sigma*eps -> Decoder (conditioned on z) -> video.
The diffusion stage works on mean * cfg.scale_factor.

Shapes: B batch, C channels, T frames (pixels: T = 1+4k), H, W pixels,
z latent channels, f = cfg.spatial_factor (8 full, 4 tiny).

References: LanDiff (arXiv 2503.04606) uses the VAE of CogVideoX
(arXiv 2408.06072); SpatialNorm from MoVQ (arXiv 2209.09002); the KL-regularised
autoencoder and its latent scale factor from LDM (arXiv 2112.10752). The layers,
their order and parameter shapes follow diffusers' AutoencoderKLCogVideoX at the
CogVideoX-2B config (215,583,907 parameters), so its weights load by a key map.
Every number, full and tiny: docs/DESIGN.md §2 and §7.

What we do differently from the release, on purpose:
- GroupNorm statistics are taken PER FRAME (over a group of channels x H x W of
  one frame), not over all frames of the chunk. Release norms mix frames, so
  the latent of frame 0 depends on frame 48, and chunked decoding differs from
  whole decoding; per-frame norms make encoder and decoder exactly causal and
  chunked == whole decoding (up to float rounding), at no parameter cost. Wan's
  VAE (arXiv 2503.20314) likewise never lets its norms mix frames.
- "The first frame is alone" is decided by position (`first`: does this chunk
  start the clip?), not by the parity of the chunk length as in the release,
  which maps an even number of latent frames (e.g. 2) to 8 RGB frames instead
  of 5. For every odd-length clip the two rules give the same numbers.
- SpatialNorm runs its two 1x1x1 convs on the small latent grid and resizes
  their outputs, instead of resizing z first: the same numbers (a pointwise conv
  commutes with nearest resizing) for a fraction of the work.
- Encoding runs on the whole clip (the release encodes 8 frames at a time; with
  per-frame norms that gives the same result). No memory-splitting "SafeConv",
  no spatial tiling, no dropout (the release's is 0).
- Training loss: MSE (+ L1, which train_tiny.py turns on) + a tiny KL only. The
  release adds LPIPS and a GAN loss, which the toy world does not need.
- Initialisation: PyTorch defaults, as in the release, except that the tiny
  preset starts the decoder's output bias at the toy world's black background
  (`out_bias`, see VAE.initialize_weights). No layer is zero-inited.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    in_ch: int = 3  # RGB
    base_ch: int = 8  # channels of the full-resolution level
    ch_mult: tuple = (1, 2, 4)  # channels per level = base_ch * mult; len - 1 = spatial halvings
    n_res: int = 1  # ResNet blocks per encoder level (the decoder has n_res + 1)
    z_ch: int = 8  # latent channels (the encoder emits 2 * z_ch: mean and log-variance)
    groups: int = 4  # GroupNorm channel groups
    # GroupNorm epsilon (release 1e-6). Tiny: 1e-2. A per-frame group of our 2 channels on a black
    # frame with one small object has a variance near 0, so dividing by sqrt(var + 1e-6) would
    # amplify its noise up to 1000x; 1e-2 caps that gain at 10.
    eps: float = 1e-2
    time_levels: int = 2  # the first `time_levels` encoder levels (and decoder levels) also halve (double) time
    # multiply latents by this before diffusion (LDM's unit-variance trick). The tiny
    # value is a placeholder: train_tiny.py measures the trained latents' std and sets it.
    scale_factor: float = 1.0
    # the decoder's output bias at init (None: PyTorch's default, as the release); tiny: -1, the toy
    # world's black background (VAE.initialize_weights says why)
    out_bias: float | None = -1.0

    def __post_init__(self):  # checked here, not under "checks": PRESETS below are built at import
        levels = len(self.ch_mult) - 1
        if self.n_res < 1:  # the first ResBlock of each encoder level changes the width
            raise ValueError(f"n_res must be >= 1, got {self.n_res}")
        if not 0 <= self.time_levels <= levels:
            raise ValueError(f"time_levels must be in 0..{levels} (len(ch_mult) - 1), got {self.time_levels}")
        for width in (self.base_ch * m for m in self.ch_mult):
            if width % self.groups:
                raise ValueError(f"every level's channels must be divisible by groups={self.groups}, got {width}")

    @property
    def spatial_factor(self):
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def temporal_factor(self):
        return 2 ** self.time_levels


PRESETS = {
    # 476,955 params (encoder 184,712 + decoder 292,243); 17x32x32 -> 5x8x8x8
    "tiny": VAEConfig(),
    # 215,583,907 params (encoder 92,215,456 + decoder 123,368,451), as the release;
    # 49x480x720 -> 13x60x90x16
    "full": VAEConfig(base_ch=128, ch_mult=(1, 2, 2, 4), n_res=3, z_ch=16, groups=32, eps=1e-6,
                      scale_factor=1.15258426, out_bias=None),
}


# ---------------------------------------------------------------------------- blocks


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are taken over each frame separately (see the docstring)."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        y = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B*T, C, H, W): every frame its own sample
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.view(B, T, C, H, W).transpose(1, 2)  # (B, C, T, H, W)


class CausalConv3d(nn.Conv3d):
    """3x3x3 conv whose output frame t sees input frames t-2, t-1, t only.

    The two missing frames on the left are copies of the first frame, or, when
    decoding chunk by chunk, the last two input frames of the previous chunk,
    kept in `cache` (a dict: this conv -> those frames). Space is zero-padded."""

    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, kernel_size=3, padding=(0, 1, 1))

    def forward(self, x, cache=None):
        # BEGIN SOLUTION causal_conv: prepend 2 frames (the cache's, or the first frame twice), store the last 2 inputs in the cache, convolve
        past = cache.get(self) if cache is not None else None
        if past is None:  # the clip starts here: repeat its first frame
            past = x[:, :, :1].expand(-1, -1, 2, -1, -1)  # (B, C, 2, H, W)
        x = torch.cat([past, x], dim=2)  # (B, C, 2+T, H, W)
        if cache is not None:  # clone so the cache does not pin the whole chunk in memory
            cache[self] = x[:, :, -2:].clone()  # (B, C, 2, H, W)
        return super().forward(x)  # (B, C_out, T, H, W)
        # END SOLUTION


def resize_nearest(z, size, first):
    """Nearest-neighbour resize of z (B, C, T, h, w) to size (T', H, W). When this
    chunk starts the clip (`first`), frame 0 maps to frame 0 alone and frames
    1.. to frames 1.. (1+k -> 1+k*r), so the first frame stays on its own."""
    if first and z.shape[2] > 1:
        head = F.interpolate(z[:, :, :1], size=(1, *size[1:]))  # (B, C, 1, H, W)
        rest = F.interpolate(z[:, :, 1:], size=(size[0] - 1, *size[1:]))  # (B, C, T'-1, H, W)
        return torch.cat([head, rest], dim=2)
    return F.interpolate(z, size=tuple(size))  # (B, C, T', H, W)


class SpatialNorm(nn.Module):
    """Decoder norm conditioned on the latent (MoVQ, arXiv 2209.09002):
    GroupNorm(f) * conv_y(z) + conv_b(z), with z resized to f's grid."""

    def __init__(self, c, z_ch, cfg):
        super().__init__()
        self.norm = FrameGroupNorm(cfg.groups, c, cfg.eps)
        self.conv_y = nn.Conv3d(z_ch, c, 1)
        self.conv_b = nn.Conv3d(z_ch, c, 1)

    def forward(self, f, z, first):
        # a 1x1x1 conv commutes with nearest resizing, so run it on the small latent
        # grid and resize its output: the release's numbers at a fraction of the cost
        y = resize_nearest(self.conv_y(z), f.shape[2:], first)  # (B, C, T, H, W) on f's grid
        b = resize_nearest(self.conv_b(z), f.shape[2:], first)  # (B, C, T, H, W)
        return self.norm(f) * y + b


def norm_layer(c, cfg, z_ch=None):
    """The norm of c channels: FrameGroupNorm in the encoder, SpatialNorm on the latent (z_ch set) in the decoder."""
    if z_ch:
        return SpatialNorm(c, z_ch, cfg)
    return FrameGroupNorm(cfg.groups, c, cfg.eps)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a skip (1x1x1 conv when the width changes).
    With z_ch set, the norms are SpatialNorms conditioned on the latent (decoder)."""

    def __init__(self, c_in, c_out, cfg, z_ch=None):
        super().__init__()
        self.norm1 = norm_layer(c_in, cfg, z_ch)
        self.conv1 = CausalConv3d(c_in, c_out)
        self.norm2 = norm_layer(c_out, cfg, z_ch)
        self.conv2 = CausalConv3d(c_out, c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cache=None, z=None, first=True):
        h = self.norm1(x) if z is None else self.norm1(x, z, first)
        h = self.conv1(F.silu(h), cache)
        h = self.norm2(h) if z is None else self.norm2(h, z, first)
        h = self.conv2(F.silu(h), cache)
        return self.skip(x) + h


class Downsample(nn.Conv2d):
    """Halve H and W with a stride-2 3x3 conv on each frame; with `time`, first
    halve T by averaging frame pairs, keeping frame 0 alone: 1+2k -> 1+k."""

    def __init__(self, c, time):
        super().__init__(c, c, kernel_size=3, stride=2, padding=0)
        self.time = time

    def forward(self, x):
        if self.time:
            head = x[:, :, :1]  # frame 0
            rest = x[:, :, 1:]  # frames 1..2k
            B, C, T, H, W = rest.shape
            rest = rest.view(B, C, T // 2, 2, H, W).mean(3)  # (B, C, k, H, W): mean of each pair
            x = torch.cat([head, rest], dim=2)  # (B, C, 1+k, H, W)
        x = F.pad(x, (0, 1, 0, 1))  # pad right and bottom only (release): even H -> H/2
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C, H/2, W/2)
        return y.view(B, T, C, *y.shape[2:]).transpose(1, 2)  # (B, C, T, H/2, W/2)


class Upsample(nn.Conv2d):
    """Double H and W (nearest, then a 3x3 conv on each frame); with `time`, also
    double T by repeating frames, frame 0 of the clip alone: 1+k -> 1+2k."""

    def __init__(self, c, time):
        super().__init__(c, c, kernel_size=3, padding=1)
        self.time = time

    def forward(self, x, first):
        B, C, T, H, W = x.shape
        T_out = T
        if self.time:  # the clip's frame 0 stays one frame: 1+k -> 1+2k; a later chunk's k -> 2k
            T_out = 2 * T - 1 if first else 2 * T
        x = resize_nearest(x, (T_out, 2 * H, 2 * W), first)  # (B, C, T_out, 2H, 2W)
        y = super().forward(x.transpose(1, 2).reshape(B * T_out, C, 2 * H, 2 * W))  # (B*T_out, C, 2H, 2W)
        return y.view(B, T_out, C, 2 * H, 2 * W).transpose(1, 2)  # (B, C, T_out, 2H, 2W)


class Encoder(nn.Module):
    """conv_in -> per level: ResBlocks, then Downsample (time too in the first
    time_levels levels) -> 2 ResBlocks -> norm, SiLU -> conv_out to 2*z channels."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]  # tiny: 8, 16, 32
        in_widths = [widths[0], *widths[:-1]]  # each level's first ResBlock widens from the previous level
        self.conv_in = CausalConv3d(cfg.in_ch, widths[0])
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(c_in if j == 0 else c, c, cfg) for j in range(cfg.n_res))
            for c_in, c in zip(in_widths, widths))
        self.downs = nn.ModuleList(Downsample(c, i < cfg.time_levels) for i, c in enumerate(widths[:-1]))
        self.mid = nn.ModuleList(ResBlock(widths[-1], widths[-1], cfg) for _ in range(2))
        self.norm_out = norm_layer(widths[-1], cfg)
        self.conv_out = CausalConv3d(widths[-1], 2 * cfg.z_ch)

    def forward(self, x):
        h = self.conv_in(x)  # (B, C0, T, H, W)
        for i, level in enumerate(self.blocks):
            for block in level:
                h = block(h)
            if i < len(self.downs):
                h = self.downs[i](h)  # (B, C, T', H/2, W/2)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, 1+(T-1)/4, H/f, W/f)


class Decoder(nn.Module):
    """conv_in -> 2 ResBlocks -> per level (widest first): n_res+1 ResBlocks, then
    Upsample -> norm, SiLU -> conv_out to RGB. Every norm is a SpatialNorm on z."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.base_ch * m for m in reversed(cfg.ch_mult)]  # tiny: 32, 16, 8
        in_widths = [widths[0], *widths[:-1]]  # each level's first ResBlock narrows from the previous level
        self.conv_in = CausalConv3d(cfg.z_ch, widths[0])
        self.mid = nn.ModuleList(ResBlock(widths[0], widths[0], cfg, cfg.z_ch) for _ in range(2))
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(c_in if j == 0 else c, c, cfg, cfg.z_ch) for j in range(cfg.n_res + 1))
            for c_in, c in zip(in_widths, widths))
        self.ups = nn.ModuleList(Upsample(c, i < cfg.time_levels) for i, c in enumerate(widths[:-1]))
        self.norm_out = norm_layer(widths[-1], cfg, cfg.z_ch)
        self.conv_out = CausalConv3d(widths[-1], cfg.in_ch)

    def forward(self, z, first=True, cache=None):
        """z (B, z, t, h, w): the whole clip, or one chunk of it (first: it starts the clip;
        cache: the causal convs' frames from the previous chunk, updated in place)."""
        h = self.conv_in(z, cache)  # (B, C, t, h, w)
        for block in self.mid:
            h = block(h, cache, z, first)
        for i, level in enumerate(self.blocks):
            for block in level:
                h = block(h, cache, z, first)
            if i < len(self.ups):
                h = self.ups[i](h, first)  # (B, C, t', 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h, z, first)), cache)  # (B, 3, T, H, W)


# ---------------------------------------------------------------------------- the VAE


class VAE(nn.Module):
    """Encoder -> mean, logvar; Decoder (z, conditioned on z) -> video; decode whole or chunk by chunk."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # Every layer keeps the default init its constructor gave it, as the release: PyTorch's
        # Kaiming-uniform conv weights and uniform biases, GroupNorm weight 1 and bias 0. Nothing is zero-inited.
        # The decoder's output bias starts at cfg.out_bias when set. Tiny: -1, black, the toy world's
        # background, which covers ~93% of the pixels (docs/DESIGN.md §7). From a bias near 0 the first
        # thing plain MSE learns is that background, while objects stay grey; starting the output at the
        # background leaves the gradient to the objects from the first step.
        if self.cfg.out_bias is not None:
            nn.init.constant_(self.decoder.conv_out.bias, self.cfg.out_bias)

    def encode(self, x):
        """x (B, 3, 1+4k, H, W) in [-1, 1] -> mean, logvar, each (B, z, 1+k, H/f, W/f)."""
        check_video(self.cfg, x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, z, t, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)  # the release's clamp keeps exp(logvar) finite

    def decode(self, z, chunk=None):
        """z (B, z, t, h, w) -> video (B, 3, 1+4(t-1), f*h, f*w).

        chunk=None decodes all frames at once; chunk=n decodes n latent frames
        per step, carrying each causal conv's last two frames over, so memory is
        bounded by n. Latent frame 0 makes a single RGB frame, so the first step
        takes it together with the next n: every step then yields 4n RGB frames."""
        check_latent(self.cfg, z, chunk)
        if chunk is None:
            return self.decoder(z)
        t = z.shape[2]
        starts = [0, *range(1 + chunk, t, chunk)]  # t=13, n=2: 0, 3, 5, .., 11 (the release's batching)
        ends = [*starts[1:], t]  # t=13, n=2: 3, 5, 7, .., 13
        cache = {}  # each causal conv's last two input frames, carried from chunk to chunk
        chunks = []
        for start, end in zip(starts, ends):
            chunks.append(self.decoder(z[:, :, start:end], start == 0, cache))  # RGB frames of latents start..end-1
        return torch.cat(chunks, dim=2)  # (B, 3, T, H, W)


# ---------------------------------------------------------------------------- loss


def vae_loss(vae, x, kl_weight=1e-6, weight=None, l1_weight=0.0):
    """Reparameterised VAE loss, a scalar: pixel MSE (+ l1_weight * pixel L1) + kl_weight * KL.
    kl_weight weighs the summed KL against the summed squared error, as in LDM, so 1e-6 only keeps
    the latent scale in check; train_tiny.py then rescales latents by their measured std.
    weight (broadcastable to x), if given, weighs each pixel's error: small objects on a flat
    background otherwise learn their colour last (docs/DESIGN.md §7). L1 is minimised by the median
    of what a pixel could be, MSE by the mean: where the decoder is unsure whether an edge pixel is
    object or background, L1 commits to one of them and MSE paints it half-bright, which rounds a
    square's corners off (the release gets sharp edges from LPIPS and a GAN loss instead)."""
    mean, logvar = vae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # z ~ N(mean, sigma^2), differentiable
    diff = vae.decode(z) - x  # (B, 3, T, H, W)
    err = diff.square() + l1_weight * diff.abs()
    if weight is not None:
        err = err * weight
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum() / x.numel()  # KL(q || N(0, I)), per pixel value
    return err.mean() + kl_weight * kl


# ---------------------------------------------------------------------------- checks


def check_video(cfg, x):
    spatial = cfg.spatial_factor
    temporal = cfg.temporal_factor
    if x.dim() != 5 or x.shape[1] != cfg.in_ch:
        raise ValueError(f"x must be (B, {cfg.in_ch}, T, H, W), got {tuple(x.shape)}")
    if (x.shape[2] - 1) % temporal:
        raise ValueError(f"frames must be 1+{temporal}k (1, {1 + temporal}, {1 + 2 * temporal}, ...), "
                         f"got {x.shape[2]}")
    if x.shape[3] % spatial or x.shape[4] % spatial:
        raise ValueError(f"H and W must be multiples of {spatial}, got {x.shape[3]}x{x.shape[4]}")


def check_latent(cfg, z, chunk):
    if z.dim() != 5 or z.shape[1] != cfg.z_ch:
        raise ValueError(f"z must be (B, {cfg.z_ch}, t, h, w), got {tuple(z.shape)}")
    if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")


# ---------------------------------------------------------------------------- demo


if __name__ == "__main__":
    torch.manual_seed(0)
    vae = VAE(PRESETS["tiny"]).eval()
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        whole = vae.decode(mean)
        chunked = vae.decode(mean, chunk=2)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            vae.decode(vae.encode(x)[0])
            times.append(time.perf_counter() - t0)
    print(f"video {tuple(x.shape)} -> mean/logvar {tuple(mean.shape)} -> video {tuple(whole.shape)}")
    print(f"chunked (2 latent frames per step) vs whole decode: max |diff| {(whole - chunked).abs().max():.1e}")
    print(f"tiny encode+decode of {tuple(x.shape)}: {sorted(times)[3] * 1e3:.1f} ms (median of 7)")
    with torch.device("meta"):
        full = VAE(PRESETS["full"])
    for name, model in (("tiny", vae), ("full", full)):
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")
