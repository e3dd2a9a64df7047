"""sample.py: text to video with the whole LanDiff pipeline (arXiv 2503.04606, Fig. 2).

    prompt -> text encoder -> LM (semantic tokens, CFG) -> tokenizer decoder (semantic features)
    -> DiT + ControlNet (flow matching, CFG) -> VAE decoder -> frames

Long clips stream: each diffusion window keeps the previous window's last `prefix` latent frames clean, and
its token segment starts with those frames' codes, re-encoded from the frames generated so far; the LM writes
the rest. The VAE decodes chunk by chunk with its cache. Full size: --weights
DIR samples the released weights (release.py); without them all is random (T5-XXL too): time and memory only.

    python sample.py --prompt "a red circle moving left"        # out/tiny checkpoints -> sample.gif
    python sample.py --prompt "a cyan circle moving up" --frames 41 --out long.mp4   # 4 windows
    python sample.py --prompts-file prompts.txt --out-dir clips  # clips/0000.gif, ..., manifest.json
    python sample.py --baseline --prompt "a red circle moving left" --out base.gif   # the base DiT alone
    python sample.py --preset full [--dry-run]   # a GPU: bf16, one stage at a time; --dry-run: any machine, no weights
"""
import argparse
import functools
import json
import os
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

import diffusion
import lm
import release
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


@dataclass
class Pipeline:  # the trained stages; a field is None when load_pipeline was asked for fewer
    vae: "vae.VAE" = None
    tok: "tokenizer.SemanticTokenizer" = None
    text: "lm.TextEncoder" = None  # release.StandInText at full size
    lm: "lm.SemanticLM" = None
    dit: "diffusion.DiT" = None
    control: "diffusion.ControlNet" = None
    device: torch.device = None  # where the stages run; None: where the DiT's weights are
    offload: bool = False  # stages wait on the CPU and visit `device` one at a time (full size)
    text_dit: torch.nn.Module = None  # the DiT's own text encoder (release: T5-v1.1-XXL; `text` is Flan-T5-XXL); None: `text`
    parameterization: object = None  # euler_sample's, for a DiT that is not a flow model (release.VPrediction)
    features: torch.nn.Module = None  # RGB -> the tokenizer's semantic features; None: the LM re-describes overlaps

    def modules(self):
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def dit_text_encoder(self):  # the DiT's own; the LM's for tiny checkpoints written before the DiT had one
        return self.text if self.text_dit is None else self.text_dit


def load_pipeline(ckpt_dir, device="cpu", dtype=torch.float32, stages=tuple(STAGES)):
    """Load the stages' checkpoints from ckpt_dir (the LM's and the DiT's files also hold their text encoders)."""
    cks = {s: load_checkpoint(os.path.join(ckpt_dir, f"{s}.pt"), s) for s in stages}
    for s in {"lm", "dit", "control"} & cks.keys():  # written before the MLPs' GELU form was a setting: the release's tanh
        cks[s]["config"].setdefault("gelu", "tanh")
    mods = {s: STAGES[s][1](STAGES[s][0](**ck["config"])) for s, ck in cks.items()}  # module(config(...))
    for s, ck in cks.items():
        try:
            mods[s].load_state_dict(ck["model"])
        except RuntimeError as e:  # written by another version of the module: names or shapes differ
            raise SystemExit(f"error: {os.path.join(ckpt_dir, s)}.pt does not fit this version's {s} "
                             f"({str(e).splitlines()[-1].strip()}); re-create it with `python train_tiny.py`") from None
    if "lm" in cks and "text" in cks["lm"]:  # tiny: the word-level encoder trained with the LM
        mods["text"] = lm.TextEncoder(mods["lm"].cfg, cks["lm"]["text"]["_extra_state"])
        mods["text"].load_state_dict(cks["lm"]["text"])
    elif "lm" in cks:  # full: T5 is not part of our checkpoints
        mods["text"] = release.StandInText(mods["lm"].cfg.text_dim, cks.get("dit", cks["lm"])["config"]["text_len"])
    if "dit" in cks and "text" in cks["dit"]:  # tiny: the DiT's own word-level encoder (frozen, kept with it)
        mods["text_dit"] = lm.TextEncoder(replace(lm.PRESETS["tiny"], gelu=cks["dit"]["config"]["gelu"]), cks["dit"]["text"]["_extra_state"])
        mods["text_dit"].load_state_dict(cks["dit"]["text"])
    if "tokenizer" in mods:  # the tokenizer's own frozen features, to re-encode generated frames
        mods["features"] = tokenizer.FrozenPatchFeatures(mods["tokenizer"].cfg)
    p = Pipeline(**{("tok" if s == "tokenizer" else s): m for s, m in mods.items()})
    if len(stages) == len(STAGES):
        check_contracts(p)
    for m in mods.values():
        m.to(device, dtype).eval().requires_grad_(False)
    return p


def random_pipeline(preset, seed=0):
    """Every stage freshly initialised from PRESETS[preset]: --dry-run (on the meta device), a full run without checkpoints."""
    torch.manual_seed(seed)
    mods = {("tok" if s == "tokenizer" else s): STAGES[s][1](PRESETS[s][preset]) for s in STAGES}
    lm_cfg = mods["lm"].cfg
    text = lm.TextEncoder(lm_cfg, []) if preset == "tiny" else release.StandInText(lm_cfg.text_dim, mods["dit"].cfg.text_len)
    p = Pipeline(text=text, features=tokenizer.FrozenPatchFeatures(mods["tok"].cfg), **mods)
    check_contracts(p)
    return p


def check_contracts(p):
    """The stages meet at three seams; a mismatch is named with both sides."""
    tok, lm_cfg, dit = p.tok.cfg, p.lm.cfg, p.dit.cfg
    pairs = [("LM codebook_size", lm_cfg.codebook_size, "tokenizer codebook", tok.codebook_size),
             ("LM tokens per segment", lm_cfg.tokens_per_segment, "tokenizer n_tokens", tok.n_tokens),
             ("DiT latent_ch", dit.latent_ch, "VAE z_ch", p.vae.cfg.z_ch), ("DiT sem_dim", dit.sem_dim, "tokenizer feat_dim", tok.feat_dim),
             ("DiT window frames", dit.frames, "tokenizer frames", tok.frames), ("DiT text_dim", dit.text_dim, "LM text_dim", lm_cfg.text_dim)]
    for name, value, other_name, other_value in pairs:
        if value != other_value:
            raise SystemExit(f"error: checkpoints disagree: {name} = {value} but {other_name} = {other_value}")


# ---------------------------------------------------------------------------- the pipeline
def clip_windows(p, frames=None):
    """RGB frames (None: one window, tiny 17, full 49) -> (frames, diffusion windows = LM segments)."""
    per_latent = p.vae.cfg.temporal_factor  # RGB frames per latent frame after the first
    stride = (p.dit.cfg.frames - p.dit.cfg.prefix) * per_latent  # RGB frames each further window adds: tiny 8
    first = 1 + (p.dit.cfg.frames - 1) * per_latent
    last = first + (1 + (p.lm.cfg.frames_max - 1) * per_latent - first) // stride * stride  # the LM's `frames` limit
    frames = first if frames is None else frames
    if not first <= frames <= last or (frames - first) % stride:
        raise ValueError(f"frames must be {first} + {stride}k ({first}, {first + stride}, ..., {last}), got {frames}")
    return frames, 1 + (frames - first) // stride


@torch.no_grad()
def generate_video(p, prompts, frames=None, motion=1.0, seed=0, guidance_lm=3.0, guidance_dit=2.0, steps=25,
                   temperature=0.6, top_k=None, baseline=False, progress=None, log=None):
    """prompts (B,) -> uint8 video (B, T, H, W, 3) in the paper's four steps; baseline=True: the base DiT alone
    from text (the paper's comparison). progress(name, i, n) moves a bar; log(line) gets each stage's report."""
    device = torch.device(p.device) if p.device is not None else next(p.dit.parameters()).device
    dtype = next(p.dit.parameters()).dtype
    frames, K = clip_windows(p, frames)
    # noise: a CPU generator (the same on any device); the LM's on its device, seed + 2**31 (seeds keep 32 bits)
    noise_generator = torch.Generator().manual_seed(seed)
    lm_generator = torch.Generator(device).manual_seed(seed + 2**31)
    stage = functools.partial(run_stage, p.offload, device, log)
    # the prompt's encodings: one conditions the LM, the other the DiT (each reads its own, as in the release)
    text = stage("text", [p.text], lambda: p.text(p.text.tokenize(prompts))).to(device, dtype)  # (B, L, D)
    dit_encoder = p.dit_text_encoder()
    text_dit = stage("text_dit", [dit_encoder], lambda: dit_encoder(dit_encoder.tokenize(prompts))).to(device, dtype)
    lm_args = dict(text=text, frames=1 + (frames - 1) // p.vae.cfg.temporal_factor, motion=motion, guidance=guidance_lm,
                   temperature=temperature, top_k=top_k, generator=lm_generator)  # frames: semantic ones
    # 1-2. Text -> semantic tokens -> semantic features, one window at a time, just before the window (window_semantics)
    semantics = None if baseline else functools.partial(window_semantics, p, stage, lm_args, progress, [])
    # 3. Semantic features -> latents: DiT + ControlNet denoise window after window, each continuing the last
    latents = stage("dit", [p.dit, None if baseline else p.control],
                    lambda: denoise(p, text_dit, semantics, windows=K, steps=steps, guidance=guidance_dit,
                                    generator=noise_generator, progress=progress))  # (B, C, T_lat, h, w)
    # 4. Latents -> frames: the VAE decoder, two latent frames at a time with its causal cache
    video = stage("vae", [p.vae], lambda: p.vae.decode(latents / p.vae.cfg.scale_factor, chunk=2))  # (B, 3, T, H, W)
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def window_semantics(p, stage, lm_args, progress, stream, k, latents):
    """Steps 1-2 for window k -> its semantic features (B, T_sem, C, h, w): the LM continues its token stream
    (`stream`, the segments of windows < k) by one segment, the tokenizer decodes it. Given p.features, the codes of
    the semantic frames the window's clean prefix fixes are those generated frames' own, re-encoded, and the LM
    writes only the new frames' codes: the branch sees the frames the DiT continues (docs/DESIGN.md §5)."""
    known = torch.cat(stream, 1) if stream else None  # (B, k * tokens_per_segment)
    overlap = None
    if k and p.features is not None:
        first = k * (p.dit.cfg.frames - p.dit.cfg.prefix)  # the window's first semantic (= latent) frame
        video = stage("vae", [p.vae], lambda: p.vae.decode(latents / p.vae.cfg.scale_factor, chunk=2).clamp(-1, 1))
        feats = stage("features", [p.features], lambda: p.features(video)[:, first:first + p.dit.cfg.prefix])
        overlap = stage("tokenizer", [p.tok], lambda: p.tok.encode(feats))  # (B, n_i + (prefix - 1) n_p)
        known = torch.cat([known, overlap], 1)
    bar = functools.partial(progress, f"lm {k + 1}") if progress else None
    new = stage("lm", [p.lm], lambda: lm.generate(p.lm, **lm_args, prefix_codes=known, progress=bar))
    stream.append(new if overlap is None else torch.cat([overlap, new], 1))
    return stage("tokenizer", [p.tok], lambda: p.tok.decode(stream[-1]))


def denoise(p, text, semantics, windows, steps, guidance, generator, progress):
    """Step 3: window k starts from window k - 1's last `prefix` latent frames, held clean; semantics(k, latents so
    far) gives its semantic features for the branch (semantics None: the base DiT alone)."""
    cfg = p.dit.cfg
    # BEGIN SOLUTION streaming: per window k: fresh noise, its semantics, euler_sample with the last prefix frames so far as its prefix; append the new frames
    latents = None
    for k in range(windows):
        noise = torch.randn(text.shape[0], cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w, generator=generator)
        sem = None if semantics is None else semantics(k, latents)
        window = diffusion.euler_sample(p.dit, noise.to(text.device, text.dtype), text, steps, guidance=guidance,
                                        controlnet=None if sem is None else p.control, sem=sem,
                                        prefix=None if k == 0 else latents[:, :, -cfg.prefix:],
                                        parameterization=p.parameterization,
                                        progress=functools.partial(progress, f"dit {k + 1}/{windows}") if progress else None)
        latents = window if k == 0 else torch.cat([latents, window[:, :, cfg.prefix:]], dim=2)
    return latents
    # END SOLUTION


def run_stage(offload, device, log, name, modules, work):
    """One stage: work() with `modules` on `device` (offload: only while it runs, on the CPU otherwise), its
    output checked (NaN/inf: a FloatingPointError naming the stage), its shape and time given to log(line)."""
    moved = [m for m in modules if m is not None] if offload else []
    for m in moved:
        m.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        out = work()
    except RuntimeError as e:  # NaN logits stop torch.multinomial before we can look at them
        if "nan" not in str(e).lower():
            raise
        out = None
    finally:
        for m in moved:
            m.to("cpu")
    if out is None or (out.is_floating_point() and not torch.isfinite(out).all()):
        raise FloatingPointError(f"NaN/inf in the {name} stage's output; run in fp32 (--dtype fp32), or bf16 "
                                 f"rather than fp16 (its range is small), or check the {name} weights")
    if log:
        gpu = f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        log(f"{name:>9}: {tuple(out.shape)} in {time.perf_counter() - start:.2f}s{gpu}")
    return out


# ---------------------------------------------------------------------------- the command line
def pipeline(args, device, dtype):
    """The checkpoints in --ckpt (default out/<preset>) or, at full size only, random weights."""
    ckpt = args.ckpt or f"out/{args.preset}"
    wait_on = "cpu" if args.preset == "full" else device  # full: the stages wait on the CPU (offload)
    if os.path.isdir(ckpt) or args.preset == "tiny":  # the tokenizer's video size tells the presets apart: read it first
        cfg = load_checkpoint(os.path.join(ckpt, "tokenizer.pt"), "tokenizer")["config"]  # none: a one-line error
        size = (cfg.get("image_h"), cfg.get("image_w"))
        found = next((k for k, c in tokenizer.PRESETS.items() if (c.image_h, c.image_w) == size), "another")
        if found != args.preset:
            raise SystemExit(f"error: {ckpt} holds {found}-preset checkpoints ({size[0]}x{size[1]} video), not --preset "
                             f"{args.preset}; pass --preset {found} or another --ckpt")
        p = load_pipeline(ckpt, wait_on, dtype)
    else:
        release.warn(f"no checkpoints in {ckpt}: every stage has RANDOM weights, the clip is noise (a time and memory run)")
        with torch.device(device):  # initialise on the GPU (fast), then wait on the CPU in `dtype`
            p = random_pipeline(args.preset)
        for m in p.modules():
            m.to(wait_on, dtype).eval().requires_grad_(False)
    if isinstance(p.text, release.StandInText):
        release.warn(f"T5-XXL is not included: the text features are {p.text.describe()}")
    return replace(p, device=torch.device(device), offload=args.preset == "full")


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
    ap.add_argument("--baseline", action="store_true", help="the base DiT alone from text: no LM, no ControlNet")
    ap.add_argument("--seed", type=int, default=0, help="clip i of a batch uses seed + i")
    ap.add_argument("--frames", type=int, help="RGB frames: one window (17 tiny, 49 full) + k streamed chunks")
    ap.add_argument("--motion-score", type=float, default=1.0, help="the LM's motion micro-condition")
    ap.add_argument("--guidance-lm", "--cfg-lm", type=float, default=3.0, help="classifier-free guidance scale of the LM")
    ap.add_argument("--guidance-dit", "--cfg-dit", type=float, default=2.0, help="classifier-free guidance scale of the DiT")
    ap.add_argument("--steps", type=int, default=25, help="Euler steps per diffusion window")
    ap.add_argument("--temperature", type=float, default=0.6, help="LM sampling temperature (0: greedy; 1: the release)")
    ap.add_argument("--top-k", type=int, help="LM: sample among the k likeliest codes")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, mps, cpu")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--dry-run", action="store_true", help="meta device only: parameters, shapes, memory estimate")
    args = release.parse_args(ap, argv)  # adds --weights DIR: the release's weights, full size, its sampler defaults
    try:
        if args.dry_run:  # tools/dry_run.py: meta-device tracing has nothing to teach about sampling
            from tools.dry_run import dry_run
            with torch.device("meta"):  # --weights: the folder's tensor names and shapes are checked first
                p = release.meta_pipeline(args.weights) if args.weights else random_pipeline(args.preset)
            return dry_run(p, args.preset, *clip_windows(p, args.frames))
        return run(args)
    except (ValueError, FloatingPointError, OSError) as e:  # the stages' messages already say what is allowed
        raise SystemExit(f"error: {e}") from None


def run(args):
    import imageio.v2 as imageio
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    device = next(k for k in ("cuda", "mps", "cpu") if have[k]) if args.device == "auto" else args.device  # chosen once
    if not have[device]:
        raise SystemExit(f"error: --device {device} is not available here; use --device auto or cpu")
    if args.preset == "full" and device == "cpu" and not args.weights:
        raise SystemExit("error: --preset full (5.1 B parameters) needs a GPU (--device cuda or mps); "
                         "on a CPU use --preset full --dry-run, or --preset tiny")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if device == "cuda" else torch.float32}[args.dtype]
    from tools.outputs import outputs  # the command line's files and folders: nothing to teach about sampling
    prompts, paths = outputs(args)
    p = release.load_release(args.weights, device, dtype, offload=True) if args.weights else pipeline(args, device, dtype)
    frames, _ = clip_windows(p, args.frames)  # a ValueError naming the schedule
    if not 0 <= args.motion_score <= p.lm.cfg.motion_max:
        raise SystemExit(f"error: --motion-score must lie in [0, {p.lm.cfg.motion_max}] (the LM's), got {args.motion_score}")
    p.text.tokenize(prompts, strict=True)  # every prompt before any work: its length, words the encoder knows
    model = "the base DiT alone (--baseline)" if args.baseline else "LanDiff"
    print(f"{args.preset}: {len(prompts)} clip(s) of {frames} frames, {model}, on {device} in {str(dtype)[6:]}, seed {args.seed}")
    bars = {}
    manifest = []

    def progress(name, i, n):  # one tqdm bar per name: the LM's tokens, each window's Euler steps
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=n, desc=f"{name:>9}", leave=False, ncols=80))
        bar.update(i - bar.n)
        if i >= n:
            bars.pop(name).close()
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        start = time.perf_counter()
        video = generate_video(p, [prompt], frames=frames, motion=args.motion_score, seed=args.seed + i,
                               guidance_lm=args.guidance_lm, guidance_dit=args.guidance_dit, steps=args.steps,
                               temperature=args.temperature, top_k=args.top_k, baseline=args.baseline,
                               progress=progress, log=print)[0]  # (T, H, W, 3)
        # 8 fps, at the model's resolution (macro_block_size=1: mp4 never rescales; our sizes are even for H.264)
        imageio.mimsave(path, list(video.numpy()), **(dict(fps=8, macro_block_size=1) if path.endswith(".mp4")
                                                      else dict(duration=125, loop=0)))
        print(f"wrote {path}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} in "
              f"{time.perf_counter() - start:.1f}s ({prompt!r}, seed {args.seed + i})")
        manifest.append(dict(prompt=prompt, path=path, seed=args.seed + i, frames=frames,
                             motion_score=args.motion_score, baseline=args.baseline))
    if args.prompts_file:
        with open(os.path.join(args.out_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


if __name__ == "__main__":
    main()
