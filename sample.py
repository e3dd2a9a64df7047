"""sample.py: text to video with the whole LanDiff pipeline (arXiv 2503.04606, Fig. 2).

    prompt -> text encoder -> LM (semantic tokens, CFG) -> tokenizer decoder (semantic features)
    -> DiT + ControlNet (flow matching, CFG) -> VAE decoder -> frames

Long clips stream: the LM writes one token segment per diffusion window, each window keeps the
previous window's last `prefix` latent frames clean, the VAE decodes chunk by chunk with its cache.
Full size: T5-XXL is not included (the text is a seeded random stand-in of its shape, (B, 226, 4096))
and without out/full every weight is random: such a run measures time and memory, and says so loudly.

    python sample.py --prompt "a red circle moving left"        # out/tiny checkpoints -> sample.gif
    python sample.py --prompt "a cyan circle moving up" --frames 41 --out long.mp4   # 4 windows
    python sample.py --prompts-file prompts.txt --out-dir clips  # clips/0000.gif, ..., manifest.json
    python sample.py --preset full --dry-run                     # any machine: parameters, shapes, memory
    python sample.py --preset full                               # a GPU: bf16, SDPA, one stage at a time on it
"""
import argparse
import json
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import diffusion
import lm
import tokenizer
import vae

# checkpoint name -> (config class, module class); train_tiny.py writes one file per stage
STAGES = {"vae": (vae.VAEConfig, vae.VAE), "tokenizer": (tokenizer.TokenizerConfig, tokenizer.SemanticTokenizer),
          "lm": (lm.LMConfig, lm.SemanticLM), "dit": (diffusion.DiffusionConfig, diffusion.DiT),
          "control": (diffusion.DiffusionConfig, diffusion.ControlNet)}
PRESETS = dict(vae=vae.PRESETS, tokenizer=tokenizer.PRESETS, lm=lm.PRESETS, dit=diffusion.PRESETS, control=diffusion.PRESETS)


# ---------------------------------------------------------------------------- checkpoints and stages
def save_checkpoint(path, **payload):
    """Write atomically: a crash mid-write leaves the previous file intact (temp file + rename)."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, stage):
    """-> the checkpoint dict, with a clear message for a missing, corrupt or foreign file."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint {path}; make the tiny ones with `python train_tiny.py`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file at all
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); "
                         f"re-create it with `python train_tiny.py --stage {stage}`") from None
    if not isinstance(ck, dict) or ck.get("stage") != stage or "model" not in ck:
        raise SystemExit(f"error: {path} is not a '{stage}' checkpoint (it says {ck.get('stage') if isinstance(ck, dict) else '?'})")
    return ck


def build(stage, ck):
    """Rebuild a stage's module from its checkpoint (config + weights)."""
    cfg_cls, mod_cls = STAGES[stage]
    cfg = cfg_cls(**ck["config"])
    m = mod_cls(cfg)
    m.load_state_dict(ck["model"])
    return m.eval()


class StandInText(torch.nn.Module):
    """T5-XXL is not included: per prompt, seeded random features of T5's shape (seed: crc32 of the
    prompt), zero after its words + T5's end token, like padded T5 output."""

    def __init__(self, dim, length):
        super().__init__()
        self.dim, self.length, self.tokenize = dim, length, list

    def forward(self, prompts):
        out = torch.zeros(len(prompts), self.length, self.dim)  # (B, L, dim)
        for b, s in enumerate(prompts):
            n = min(len(s.split()) + 1, self.length)
            out[b, :n] = torch.randn(n, self.dim, generator=torch.Generator().manual_seed(zlib.crc32(s.encode())))
        return out


@dataclass
class Pipeline:  # the trained stages; a field is None when load_pipeline was asked for fewer
    vae: "vae.VAE" = None
    tok: "tokenizer.SemanticTokenizer" = None
    text: "lm.TextEncoder" = None  # StandInText at full size
    lm: "lm.SemanticLM" = None
    dit: "diffusion.DiT" = None
    control: "diffusion.ControlNet" = None
    device: torch.device = None  # where the stages run; None: where the DiT's weights are
    offload: bool = False  # stages wait on the CPU and visit `device` one at a time (full size)

    def modules(self):
        return [m for m in (self.text, self.lm, self.tok, self.dit, self.control, self.vae) if m is not None]


def load_pipeline(ckpt_dir, device="cpu", dtype=torch.float32, stages=tuple(STAGES)):
    """Load the stages' checkpoints from ckpt_dir (the LM's file also holds the text encoder)."""
    cks = {s: load_checkpoint(os.path.join(ckpt_dir, f"{s}.pt"), s) for s in stages}
    mods = {s: build(s, ck) for s, ck in cks.items()}
    if "lm" in cks and "text" in cks["lm"]:  # tiny: the word-level encoder trained with the LM
        mods["text"] = lm.TextEncoder(mods["lm"].cfg, cks["lm"]["text"]["_extra_state"])
        mods["text"].load_state_dict(cks["lm"]["text"])
    elif "lm" in cks:  # full: T5 is not part of our checkpoints
        mods["text"] = StandInText(mods["lm"].cfg.text_dim, cks.get("dit", cks["lm"])["config"]["text_len"])
    p = Pipeline(**{("tok" if s == "tokenizer" else s): m for s, m in mods.items()})
    if len(stages) == len(STAGES):
        check_contracts(p)
    for m in mods.values():
        m.to(device, dtype).eval().requires_grad_(False)
    return p


def random_pipeline(preset, seed=0):
    """Every stage freshly initialised from PRESETS[preset]: for --dry-run (under torch.device("meta"):
    no memory, no arithmetic) and for a full-size run without checkpoints."""
    torch.manual_seed(seed)
    mods = {("tok" if s == "tokenizer" else s): STAGES[s][1](PRESETS[s][preset]) for s in STAGES}
    c = mods["lm"].cfg
    text = lm.TextEncoder(c, []) if preset == "tiny" else StandInText(c.text_dim, PRESETS["dit"][preset].text_len)
    p = Pipeline(text=text, **mods)
    check_contracts(p)
    return p


def check_contracts(p):
    """The stages meet at three seams; a mismatch is named with both sides."""
    t, l, d, v = p.tok.cfg, p.lm.cfg, p.dit.cfg, p.vae.cfg
    pairs = [("LM codebook_size", l.codebook_size, "tokenizer codebook", t.codebook_size),
             ("LM tokens per segment", l.tokens_per_segment, "tokenizer n_tokens", t.n_tokens),
             ("DiT latent_ch", d.latent_ch, "VAE z_ch", v.z_ch), ("DiT sem_dim", d.sem_dim, "tokenizer feat_dim", t.feat_dim),
             ("DiT window frames", d.frames, "tokenizer frames", t.frames), ("DiT text_dim", d.text_dim, "LM text_dim", l.text_dim)]
    for a, x, b, y in pairs:
        if x != y:
            raise SystemExit(f"error: checkpoints disagree: {a} = {x} but {b} = {y}")


# ---------------------------------------------------------------------------- the pipeline
def n_windows(p, frames):
    """RGB frames -> number of diffusion windows (= LM segments); frames must fit the schedule."""
    W, pre, tf = p.dit.cfg.frames, p.dit.cfg.prefix, p.vae.cfg.temporal_factor
    stride, first = (W - pre) * tf, 1 + (W - 1) * tf  # tiny: 8 and 17; full: 24 and 49
    last = first + (1 + (p.lm.cfg.frames_max - 1) * tf - first) // stride * stride  # the LM's `frames` limit
    if not first <= frames <= last or (frames - first) % stride:
        raise ValueError(f"frames must be {first} + {stride}k ({first}, {first + stride}, ..., {last}), got {frames}")
    return 1 + (frames - first) // stride


@torch.no_grad()
def generate_video(p, prompts, frames=17, motion=1.0, seed=0, cfg_lm=3.0, cfg_dit=2.0, steps=25,
                   temperature=1.0, top_k=None, baseline=False, progress=None, log=None):
    """prompts (B,) -> uint8 video (B, T, H, W, 3). baseline=True skips the LM and ControlNet:
    the base DiT alone from text (the paper's comparison). Each stage's output is checked for
    NaN/inf (FloatingPointError naming the stage); log(line) gets its shape and time (GPU peak)."""
    g = torch.Generator().manual_seed(seed)  # noise comes from the CPU: the same numbers on any device
    dev = torch.device(p.device) if p.device is not None else next(p.dit.parameters()).device
    dt, c = next(p.dit.parameters()).dtype, p.dit.cfg
    g_lm = g if dev.type == "cpu" else torch.Generator(dev).manual_seed(seed)  # multinomial wants its device
    B, K, n_sem = len(prompts), n_windows(p, frames), 1 + (frames - 1) // p.vae.cfg.temporal_factor

    def stage(name, fn, *mods):  # one stage: on the device (offload: only while it runs), checked, timed
        for m in mods if p.offload else ():
            m.to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0, out = time.perf_counter(), None
        try:
            out = fn()
        except RuntimeError as e:  # NaN logits stop torch.multinomial before we can look at them
            if "nan" not in str(e).lower():
                raise
        finally:
            for m in mods if p.offload else ():
                m.to("cpu")
        if out is None or (out.is_floating_point() and not torch.isfinite(out).all()):
            raise FloatingPointError(f"NaN/inf in the {name} stage's output; run in fp32 (--dtype fp32), or bf16 "
                                     f"rather than fp16 (its range is small), or check the {name} weights")
        if log:
            gpu = f", GPU peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
            log(f"{name:>9}: {tuple(out.shape)} in {time.perf_counter() - t0:.2f}s{gpu}")
        return out

    text = stage("text", lambda: p.text(p.text.tokenize(prompts)).to(dev, dt), p.text)  # (B, L, D)
    motion = torch.as_tensor(motion, dtype=torch.float32).expand(B).to(dev)
    if not baseline:  # n_sem: the LM's `frames` micro-condition counts the clip's semantic frames
        codes = stage("lm", lambda: lm.generate(p.lm, text, n_sem, motion, n_segments=K, guidance=cfg_lm,
                                                temperature=temperature, top_k=top_k, generator=g_lm,
                                                progress=progress and (lambda i, n: progress("lm", i, n))), p.lm)
        sem = stage("tokenizer", lambda: p.tok.decode(codes.view(B * K, -1)), p.tok)  # every window in one batch
        sem = sem.unflatten(0, (B, K))  # (B, K, T_sem, C, h, w): window k's features

    def denoise():
        lat = None
        for k in range(K):  # window k covers latent frames [k*stride, k*stride + W)
            noise = torch.randn(B, c.latent_ch, c.frames, c.lat_h, c.lat_w, generator=g).to(dev, dt)
            x = diffusion.euler_sample(p.dit, noise, text, steps, cfg_dit, None if baseline else p.control,
                                       None if baseline else sem[:, k], None if k == 0 else lat[:, :, -c.prefix:],
                                       progress and (lambda i, n: progress(f"dit {k + 1}/{K}", i, n)))
            lat = x if k == 0 else torch.cat([lat, x[:, :, c.prefix:]], dim=2)  # (B, C, T_lat, h, w)
        return lat
    lat = stage("dit", denoise, p.dit, *([] if baseline else [p.control]))
    video = stage("vae", lambda: p.vae.decode(lat / p.vae.cfg.scale_factor, chunk=2), p.vae)  # (B, 3, T, H, W)
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


# ---------------------------------------------------------------------------- the command line
def outputs(a):
    """-> the prompts and each clip's path, all checked before any work."""
    if a.prompts_file and not a.out_dir:
        raise SystemExit("error: --prompts-file needs --out-dir (a folder for 0000.gif, ... and manifest.json)")
    if not a.prompts_file and not a.out.endswith((".gif", ".mp4")):
        raise SystemExit(f"error: --out must end in .gif or .mp4, got {a.out}")
    prompts = [a.prompt] if not a.prompts_file else \
        [s.strip() for s in Path(a.prompts_file).read_text(encoding="utf-8").splitlines() if s.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompts-file {a.prompts_file} is empty; write one prompt per line")
    folder = a.out_dir if a.prompts_file else os.path.dirname(a.out) or "."
    try:  # the folder (made if missing) must take our files
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write into {folder!r} ({e.strerror or e}); choose a writable folder") from None
    if a.prompts_file:
        return prompts, [os.path.join(folder, f"{i:04d}.gif") for i in range(len(prompts))]
    if a.out.endswith(".mp4"):
        try:
            import imageio_ffmpeg
            imageio_ffmpeg.get_ffmpeg_exe()
        except Exception:  # not installed, or no ffmpeg binary for this platform
            print(f"note: ffmpeg is not available (pip install imageio-ffmpeg), writing {a.out[:-4]}.gif instead")
            return prompts, [a.out[:-4] + ".gif"]
    return prompts, [a.out]


def pipeline(a, dev, dtype):
    """The checkpoints in --ckpt (default out/<preset>) or, at full size only, random weights."""
    ckpt, home, bang = a.ckpt or f"out/{a.preset}", "cpu" if a.preset == "full" else dev, "!" * 100
    if os.path.isdir(ckpt):  # the tokenizer's video size tells the presets apart: read it before loading it all
        cfg = load_checkpoint(os.path.join(ckpt, "tokenizer.pt"), "tokenizer")["config"]
        got, sizes = (cfg.get("image_h"), cfg.get("image_w")), {k: (c.image_h, c.image_w) for k, c in tokenizer.PRESETS.items()}
        if got != sizes[a.preset]:
            other = next((k for k, s in sizes.items() if s == got), "another")
            raise SystemExit(f"error: {ckpt} holds {other}-preset checkpoints ({got[0]}x{got[1]} video), not --preset "
                             f"{a.preset}; pass --preset {other} or another --ckpt")
        p = load_pipeline(ckpt, home, dtype)  # full: the stages wait on the CPU (offload)
    elif a.preset == "tiny":
        raise SystemExit(f"error: no checkpoint folder {ckpt}; make the tiny checkpoints with `python train_tiny.py` "
                         f"(about 8 minutes on a CPU) or pass --ckpt DIR")
    else:
        print(f"{bang}\nWARNING: no checkpoints in {ckpt}: every stage has RANDOM weights, the clip is noise "
              f"(a time and memory run)\n{bang}")
        with torch.device(dev):  # initialise on the GPU (fast), then wait on the CPU in `dtype`
            p = random_pipeline(a.preset)
        for m in p.modules():
            m.to(home, dtype).eval().requires_grad_(False)
    if isinstance(p.text, StandInText):
        print(f"{bang}\nWARNING: T5-XXL is not included: the text features are a seeded random "
              f"(B, {p.text.length}, {p.text.dim}) stand-in; the prompt only picks the seed\n{bang}")
    p.device, p.offload = torch.device(dev), a.preset == "full"
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="a red circle moving left")
    src.add_argument("--prompts-file", help="one prompt per line (blank lines skipped); needs --out-dir")
    ap.add_argument("--out", default="sample.gif", help=".gif or .mp4 (mp4 through imageio-ffmpeg)")
    ap.add_argument("--out-dir", help="folder for a --prompts-file batch: 0000.gif, ... and manifest.json")
    ap.add_argument("--ckpt", help="checkpoint folder (default out/<preset>)")
    ap.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--seed", type=int, default=0, help="clip i of a batch uses seed + i")
    ap.add_argument("--frames", type=int, help="RGB frames: one window (17 tiny, 49 full) + k streamed chunks")
    ap.add_argument("--motion-score", type=float, default=1.0, help="the LM's motion micro-condition")
    ap.add_argument("--cfg-lm", type=float, default=3.0, help="classifier-free guidance scale of the LM")
    ap.add_argument("--cfg-dit", type=float, default=2.0, help="guidance scale of the DiT (tiny: 2 beat 1.5, 3 and 4)")
    ap.add_argument("--steps", type=int, default=25, help="Euler steps per diffusion window")
    ap.add_argument("--temperature", type=float, default=1.0, help="LM sampling temperature (0: greedy)")
    ap.add_argument("--top-k", type=int, help="LM: sample among the k likeliest codes")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, mps, cpu")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--dry-run", action="store_true", help="meta device only: parameters, shapes, memory estimate")
    a = ap.parse_args(argv)
    try:
        if a.dry_run:  # tools/dry_run.py: meta-device tracing has nothing to teach about sampling
            from tools.dry_run import dry_run
            with torch.device("meta"):
                p = random_pipeline(a.preset)
            frames = a.frames or 1 + (p.dit.cfg.frames - 1) * p.vae.cfg.temporal_factor
            return dry_run(p, a.preset, frames, n_windows(p, frames))
        return run(a)
    except (ValueError, FloatingPointError, OSError) as e:  # the stages' messages already say what is allowed
        raise SystemExit(f"error: {e}") from None


def run(a):
    import imageio.v2 as imageio
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    dev = next(k for k in ("cuda", "mps", "cpu") if have[k]) if a.device == "auto" else a.device  # chosen once, here
    if not have[dev]:
        raise SystemExit(f"error: --device {dev} is not available here; use --device auto or cpu")
    if a.preset == "full" and dev == "cpu":
        raise SystemExit("error: --preset full (5.1 B parameters) needs a GPU (--device cuda or mps); "
                         "on a CPU use --preset full --dry-run, or --preset tiny")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if dev == "cuda" else torch.float32}[a.dtype]
    prompts, paths = outputs(a)
    p = pipeline(a, dev, dtype)
    frames = a.frames or 1 + (p.dit.cfg.frames - 1) * p.vae.cfg.temporal_factor
    n_windows(p, frames)  # a ValueError naming the schedule
    if not 0 <= a.motion_score <= p.lm.cfg.motion_max:
        raise SystemExit(f"error: --motion-score must lie in [0, {p.lm.cfg.motion_max}] (the LM's motion_max), "
                         f"got {a.motion_score}")
    print(f"{a.preset}: {len(prompts)} clip(s) of {frames} frames on {dev} in {str(dtype)[6:]}, seed {a.seed}")
    bars, manifest = {}, []

    def progress(name, i, n):  # one tqdm bar per name: the LM's tokens, each window's Euler steps
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=n, desc=f"{name:>9}", leave=False, ncols=80))
        bar.update(i - bar.n)
        if i >= n:
            bars.pop(name).close()
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        t0 = time.perf_counter()
        video = generate_video(p, [prompt], frames, a.motion_score, a.seed + i, a.cfg_lm, a.cfg_dit, a.steps,
                               a.temperature, a.top_k, progress=progress, log=print)[0]  # (T, H, W, 3)
        # 8 fps, at the model's resolution (macro_block_size=1: mp4 never rescales; our sizes are even for H.264)
        imageio.mimsave(path, list(video.numpy()), **(dict(fps=8, macro_block_size=1) if path.endswith(".mp4")
                                                      else dict(duration=125, loop=0)))
        print(f"wrote {path}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} in "
              f"{time.perf_counter() - t0:.1f}s ({prompt!r}, seed {a.seed + i})")
        manifest.append(dict(prompt=prompt, path=path, seed=a.seed + i, frames=frames, motion_score=a.motion_score))
    if a.prompts_file:
        with open(os.path.join(a.out_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    main()
