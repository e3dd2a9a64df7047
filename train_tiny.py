"""train_tiny.py: the whole LanDiff pipeline learns a toy world on a laptop CPU.

Moving Shapes (../shared/TOY_WORLD.md, rendered below): one coloured circle, square or triangle
glides left, right, up or down over 17 black 32x32 frames, captioned "a red circle moving left";
three colour-shape pairs are never rendered for training. Every stage is trained in data-dependency
order, as in the paper (arXiv 2503.04606 §3-4):

    VAE -> latents of the training clips   (one process)  ┐ side by side, one core each: the VAE runs
    tokenizer -> their tokens -> LM + text (another one)  ┘ only 1.4x faster on two threads than on one
    -> base DiT (text -> latents) -> ControlNet branch (base frozen; conditioned on the tokenizer's
       reconstruction of each clip's features, as the paper trains it)

then judged: clips for every colour-shape-direction combination, seen and held out, from the full
pipeline and from the base DiT alone (the paper's claim in miniature), plus long 41-frame clips
streamed window by window.

    python train_tiny.py                          # everything, 6 to 9 minutes on 2 CPU cores
    python train_tiny.py --stage lm --resume      # one stage; --resume continues where it stopped
    python train_tiny.py --stage eval             # judge the checkpoints in --out again, with their --seed
"""
import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import diffusion
import lm
import sample
import tokenizer
import vae

# ---------------------------------------------------------------------------- the world (TOY_WORLD.md)
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
          "yellow": (230, 210, 50), "magenta": (210, 60, 210), "cyan": (50, 210, 210)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
HELD_OUT = {("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square")}  # never rendered for training
TEMPLATES = ("a {color} {shape} moving {direction}", "a {color} {shape} moves {direction}",
             "{color} {shape} going {direction}", "a {shape}, {color}, moving {direction}")
SIZE, S, V_RANGE, LO, HI = 32, 10.0, (0.5, 1.25), 5.5, 26.5  # frame size, shape size, speeds, centre bounds
COMBOS = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
SPLITS = {"seen": [x for x in COMBOS if x[:2] not in HELD_OUT], "held-out": [x for x in COMBOS if x[:2] in HELD_OUT]}


def shape_mask(shape, cx, cy):
    """(..., 32, 32) bool: pixels whose centre (x+0.5, y+0.5) lies inside `shape` centred at cx, cy (...)."""
    g = torch.arange(SIZE, dtype=torch.float64) + 0.5
    dx, dy = g.view(1, -1) - cx[..., None, None], g.view(-1, 1) - cy[..., None, None]  # (..., 1, W), (..., H, 1)
    r = S / 2
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r * r
    if shape == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    return (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)  # triangle, apex up


def draw_clips(n, g, frames=17, speeds=V_RANGE, combos=SPLITS["seen"]):
    """n clip specs: colour, shape, direction, speed v, and a start that keeps every frame's centre inside.
    Deterministic for the torch.Generator g; call it again for more: the world is endless."""
    specs, travel_max = [], HI - LO
    for i in torch.randint(len(combos), (n,), generator=g).tolist():
        v = speeds[0] + (speeds[1] - speeds[0]) * torch.rand((), generator=g, dtype=torch.float64).item()
        (ux, uy), travel = DIRECTIONS[combos[i][2]], v * (frames - 1)
        if travel > travel_max:
            raise ValueError(f"speed {v:.2f} moves {travel:.1f} px in {frames} frames; at most {travel_max} px fit")
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        start = [LO - min(0, a) * travel + uu * (travel_max - abs(a) * travel) for a, uu in zip((ux, uy), u)]
        specs.append(dict(zip(("color", "shape", "direction"), combos[i]), v=v, start=start, frames=frames))
    return specs


def render(specs):
    """clip specs -> uint8 video (N, T, 32, 32, 3): flat colour on black, no anti-aliasing."""
    video = torch.zeros(len(specs), specs[0]["frames"], SIZE, SIZE, 3, dtype=torch.uint8)
    t = torch.arange(specs[0]["frames"], dtype=torch.float64)
    for i, sp in enumerate(specs):
        (ux, uy), (x0, y0) = DIRECTIONS[sp["direction"]], sp["start"]
        video[i][shape_mask(sp["shape"], x0 + ux * sp["v"] * t, y0 + uy * sp["v"] * t)] = torch.tensor(COLORS[sp["color"]], dtype=torch.uint8)
    return video


def to_float(video):  # uint8 (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1], the VAE's layout
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def captions(specs, g, template=None):  # a random template per clip, or the given one (evaluation: 0)
    pick = torch.randint(len(TEMPLATES), (len(specs),), generator=g).tolist() if template is None else [template] * len(specs)
    return [TEMPLATES[k].format(**sp) for k, sp in zip(pick, specs)]


def text_features(text, specs, g, template=None):  # clips' captions -> the text encoder's (B, L, D)
    return text(text.tokenize(captions(specs, g, template)))


# ---------------------------------------------------------------------------- judging a clip (TOY_WORLD.md)
def _centroid_offset(shape):  # a triangle's centroid lies r/3 below its nominal centre
    ys, xs = np.nonzero(shape_mask(shape, torch.tensor(16.0), torch.tensor(16.0)).numpy())
    return xs.mean() + 0.5 - 16, ys.mean() + 0.5 - 16


OFFSETS, PALETTE = {s: _centroid_offset(s) for s in SHAPES}, np.array(list(COLORS.values()), dtype=np.float64)


def judge_frames(video):
    """uint8 (T, H, W, 3) -> per frame (colour, shape, cx, cy), or None where nothing is drawn."""
    frames = video.astype(np.float64)
    bright = frames.max(-1)  # (T, H, W): brightest channel
    m = bright > bright.max((1, 2), keepdims=True) / 2  # the object: over half its peak brightness
    n, g = m.sum((1, 2)).clip(1), np.arange(SIZE) + 0.5
    cx, cy = (m * g).sum((1, 2)) / n, (m * g[:, None]).sum((1, 2)) / n  # (T,) centroids
    ious = [(m & t).sum((1, 2)) / (m | t).sum((1, 2)) for t in  # each template with ITS centroid on the object's
            (shape_mask(s, torch.from_numpy(cx - OFFSETS[s][0]), torch.from_numpy(cy - OFFSETS[s][1])).numpy() for s in SHAPES)]
    out = []
    for i, frame in enumerate(frames):
        if bright[i].max() < 64:  # no palette colour is this dark: an empty frame
            out.append(None)
            continue
        b = bright[i][m[i]]
        top = frame[m[i]][b >= np.median(b)]  # its brightest pixels
        color = list(COLORS)[np.argmin(((PALETTE - np.median(top, 0)) ** 2).sum(-1))]
        out.append((color, SHAPES[int(np.argmax([iou[i] for iou in ious]))], cx[i], cy[i]))
    return out


def direction(cxy):
    """Sign of the larger fitted centroid velocity; under 3 px of travel is "none"."""
    t = np.arange(len(cxy))
    vx, vy = np.polyfit(t, cxy[:, 0], 1)[0], np.polyfit(t, cxy[:, 1], 1)[0]
    if max(abs(vx), abs(vy)) * (len(cxy) - 1) < 3:
        return "none"
    return ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")


def accuracy(got, specs, keys=("color", "shape", "direction")):
    """Fraction of judged clips `got` whose `keys` all match their specs."""
    return float(np.mean([all(j[k] == s[k] for k in keys) for j, s in zip(got, specs)]))


def judge_clip(video, chunks=None):
    """-> colour, shape (majority over frames), direction (fit over the clip) and, for long clips,
    continuity: the same colour and shape throughout, one direction in every chunk, no jump > 3 px;
    `breaks` names the checks a clip fails, `speeds` is each chunk's fitted speed (px/frame)."""
    fr = judge_frames(video)
    seen = [x for x in fr if x is not None]
    if len(seen) < 2:
        return dict(color=None, shape=None, direction=None, continuous=False, breaks=["object lost"], speeds=[])
    cs, ss, cxy = [x[0] for x in seen], [x[1] for x in seen], np.array([x[2:] for x in seen])
    whole = len(seen) == len(fr)  # an object in every frame (else chunk indices would not line up)
    parts = [cxy[a:b] for a, b in (chunks or [])] if whole else []
    jump = np.sqrt(((cxy[1:] - cxy[:-1]) ** 2).sum(-1)).max()
    breaks = [name for name, bad in (("object lost", not whole), ("colour changes", len(set(cs)) > 1),
                                     ("shape changes", len(set(ss)) > 1), ("jump over 3 px", jump > 3),
                                     ("a chunk stalls or turns", len({direction(c) for c in parts}) > 1)) if bad]
    # majority over frames; a tie goes to the earliest frame's (over a set, to Python's per-process string hash)
    return dict(color=max(cs, key=cs.count), shape=max(ss, key=ss.count), direction=direction(cxy),
                continuous=not breaks, breaks=breaks,
                speeds=[np.abs(np.polyfit(np.arange(len(c)), c, 1)[0]).max() for c in parts])


# ---------------------------------------------------------------------------- training loop, checkpoints
# (steps, clips per batch, peak learning rate) per stage: 6-9 minutes on 2 cores. How they were chosen
# (VAE: at 800 steps some draws lose colour; DiT steps pay most, at lr 8e-3; FSQ codes collapse above
# ~2e-3; the LM would need ~5x for `motion`): README.
PLAN = dict(vae=(1200, 6, 6e-3), tokenizer=(800, 8, 1.5e-3), lm=(315, 32, 2e-3), dit=(2000, 16, 8e-3),
            control=(400, 16, 8e-3))
STAGE_NAMES = list(PLAN)
NEEDS = dict(vae=[], tokenizer=[], lm=["tokenizer"], dit=["vae", "tokenizer", "lm"], control=["vae", "tokenizer", "lm", "dit"])
SAVE_EVERY = 30  # seconds between checkpoints of a running stage
BAR = 0  # tqdm line of this process's bars (the side-by-side VAE process draws on line 1)


def fit(name, args, modules, loss_fn, cfg, g, finish=None):
    """AdamW + warm-up + cosine decay over the PLAN's steps; a tqdm bar; an atomic checkpoint every 30 s
    and at the end, with the config finish() returns if given. With --resume, a finished stage is loaded
    and skipped, an interrupted one continues."""
    steps, _, lr = PLAN[name]
    path, step, steps = os.path.join(args.out, f"{name}.pt"), 0, min(steps, args.steps or steps)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    # fused: one kernel over all tensors; on 2 CPU threads the DiT's step costs 3.4 ms instead of 15 ms
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    if args.resume and os.path.exists(path):
        ck = sample.load_checkpoint(path, name)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        if ck["done"]:
            print(f"{name}: done earlier, loaded {path}")
            return ck
        opt.load_state_dict(ck["optim"]), sched.load_state_dict(ck["sched"])
        g.set_state(ck["gen"]), torch.set_rng_state(ck["rng"])
        step = ck["step"]
        print(f"{name}: resuming at step {step}/{steps}")

    def save(done, n):
        sample.save_checkpoint(path, stage=name, config=dataclasses.asdict(cfg), done=done, step=n, seed=args.seed,
                               **{k: m.state_dict() for k, m in modules.items()}, optim=opt.state_dict(),
                               sched=sched.state_dict(), gen=g.get_state(), rng=torch.get_rng_state())

    bar = tqdm(range(step, steps), desc=f"{name:>9}", initial=step, total=steps, ncols=90, position=BAR)
    last, ema = time.time(), None
    for step in bar:
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; the last good state is in {path} "
                             f"(continue with --stage {name} --resume, or lower the learning rate)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if time.time() - last > SAVE_EVERY:
            save(False, step + 1)
            last = time.time()
    bar.close()
    cfg = finish() if finish else cfg  # (save reads cfg when called)
    save(True, steps)
    return None


def gen(args, k):  # one data stream per stage, so --stage X sees the same data as a full run
    return torch.Generator().manual_seed(args.seed * 1000 + k)


def batch(pool, n, g):  # n random clips of a pool: their indices, specs and speeds
    idx = torch.randint(len(pool["specs"]), (n,), generator=g)
    specs = [pool["specs"][i] for i in idx.tolist()]
    return idx, specs, torch.tensor([s["v"] for s in specs], dtype=torch.float32)


# ---------------------------------------------------------------------------- the stages
def stage_vae(args, ctx):
    cfg, g = vae.PRESETS["tiny"], gen(args, 1)
    torch.manual_seed(args.seed)
    model, (_, n, _) = vae.VAE(cfg), PLAN["vae"]
    # count object pixels 10x (the output starts at black: the tiny preset's out_bias): objects cover
    # ~7% of the pixels, and plain MSE learns the background first while colours stay grey (docs/DESIGN.md §7)

    def loss_fn():  # 5-frame clips hold both causal cases (the lone first frame, a group of 4); many small
        x = to_float(render(draw_clips(n, g, 5)))  # steps learnt colour faster than fewer 9- or 17-frame ones
        near = F.max_pool3d((x.amax(1, keepdim=True) > -1).float(), (1, 5, 5), 1, (0, 2, 2))  # object + 2 px
        return vae.vae_loss(model, x, weight=1 + 9 * near)
    specs = draw_clips(64, gen(args, 101))
    x = to_float(render(specs))

    def scale():  # latents x scale have unit std, the scale the DiT expects (LDM); kept in the checkpoint
        with torch.no_grad():
            model.cfg = dataclasses.replace(cfg, scale_factor=round(1 / model.encode(x)[0].std().item(), 5))
        return model.cfg
    ck = fit("vae", args, {"model": model}, loss_fn, cfg, g, finish=scale)
    model.cfg = vae.VAEConfig(**ck["config"]) if ck else model.cfg
    with torch.no_grad():
        y = model.eval().decode(model.encode(x)[0])
    mse, obj = (y - x).square(), x.amax(1, keepdim=True).expand_as(x) > -1
    got = [judge_clip(v) for v in ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()]
    ok = accuracy(got, specs, ("color", "shape"))
    ctx["vae"] = model.requires_grad_(False)
    return (f"reconstruction MSE {mse.mean():.4f} (object pixels {mse[obj].mean():.4f}), colour+shape judged right "
            f"in {ok:.0%} of reconstructions, latent scale {model.cfg.scale_factor}")


def stage_tokenizer(args, ctx):
    cfg, g, (_, n, _) = tokenizer.PRESETS["tiny"], gen(args, 2), PLAN["tokenizer"]
    torch.manual_seed(args.seed + 2)
    model, feats = tokenizer.SemanticTokenizer(cfg), tokenizer.FrozenPatchFeatures(cfg)
    loss_fn = lambda: tokenizer.tokenizer_loss(model, feats(to_float(render(draw_clips(n, g)))))  # noqa: E731
    fit("tokenizer", args, {"model": model}, loss_fn, cfg, g)
    ctx["tok"], ctx["feats"] = model.eval().requires_grad_(False), feats
    with torch.no_grad():
        f = feats(to_float(render(draw_clips(256, gen(args, 102)))))
        loss = tokenizer.tokenizer_loss(model, f)
        ids = model.encode(f)
    used, ppl = tokenizer.codebook_usage(ids, cfg.codebook_size)
    return f"feature MSE {loss:.4f} (feature variance {f.var():.4f}), codes used {used:.0%}, perplexity {ppl:.0f}"


def segments(ctx, x):
    """Clips (B, 3, T, H, W) -> each streaming window's features (B, K, frames, C, h, w): window k covers
    semantic frames [k·stride, k·stride + frames), stride = frames - prefix (sample.py's schedule)."""
    cfg, f = ctx["tok"].cfg, ctx["feats"](x)  # (B, T_sem, C, h, w)
    stride = cfg.frames - diffusion.PRESETS["tiny"].prefix
    return torch.stack([f[:, k:k + cfg.frames] for k in range(0, f.shape[1] - cfg.frames + 1, stride)], 1)


POOL = {17: (2000, V_RANGE), 25: (450, (0.5, 0.875)), 41: (250, (0.5, 0.525))}  # frames: clips, speeds (the
# fastest that fit); the LM learns from all three, the diffusion stages from the 17- and 25-frame clips


def pool_specs(args):
    """The training clips of the LM and diffusion stages, as in the paper one set of videos for both."""
    g = gen(args, 3)
    return {f: draw_clips(n if not args.steps else min(8, n), g, f, speeds) for f, (n, speeds) in POOL.items()}


@torch.no_grad()
def encode(ctx, specs, what):
    """Rendered training clips, 250 at a time -> "lat": VAE latents x scale (N, C, T_lat, h, w) for the
    diffusion stages, or "ids": each streaming window's token ids (N, K * n_tokens), the LM's stream."""
    out = []
    for i in range(0, len(specs), 250):
        x = to_float(render(specs[i:i + 250]))
        if what == "lat":
            out.append(ctx["vae"].encode(x)[0] * ctx["vae"].cfg.scale_factor)  # (b, C, T_lat, h, w)
        else:
            out.append(ctx["tok"].encode(segments(ctx, x).flatten(0, 1)).view(len(x), -1))  # (b*K, n) -> (b, K*n)
    return torch.cat(out)


@torch.no_grad()
def reconstruct(ctx, ids):
    """Token ids (N, K * n_tokens) -> the tokenizer's reconstruction of each window (N, K, frames, C, h, w):
    the ControlNet's condition, as the paper trains it (not the clip's own features)."""
    n = ctx["tok"].cfg.n_tokens
    return torch.cat([ctx["tok"].decode(b.reshape(-1, n)).unflatten(0, (len(b), -1)) for b in ids.split(250)])


def clip_latents(ctx, specs):  # {frames: clips} -> {frames: latents} of the diffusion stages' 17/25-frame clips
    return {f: encode(ctx, specs[f], "lat") for f in (17, 25)}


def lm_pools(args, ctx):  # the training clips and their token ids: needs the tokenizer only
    if "lm pools" not in ctx:
        t0 = time.time()
        ctx["lm pools"] = {f: dict(specs=sp, ids=encode(ctx, sp, "ids")) for f, sp in pool_specs(args).items()}
        print(f" lm pools: {' + '.join(str(len(p['specs'])) for p in ctx['lm pools'].values())} clips of "
              f"17/25/41 frames tokenized in {time.time() - t0:.1f}s")
    return ctx["lm pools"]


@torch.no_grad()
def unseen(args, ctx, latents=False):  # 64 fresh 17-frame clips in no training pool: the validation losses'
    if "unseen" not in ctx:  # clips, encoded once per run (--steps: 8, a quick look, like pool_specs)
        specs = draw_clips(8 if args.steps else 64, gen(args, 108))
        ctx["unseen"] = dict(specs=specs, ids=encode(ctx, specs, "ids"))
    U = ctx["unseen"]
    if latents and "lat" not in U:  # the DiT's and the branch's also need their latents and features
        U.update(lat=encode(ctx, U["specs"], "lat"), rec=reconstruct(ctx, U["ids"]))
    return U


def diffusion_pools(args, ctx, latents=None):
    """The 17- and 25-frame training clips with their latents and reconstructed features. latents() ->
    {frames: latents} (the full run waits for the VAE's process there); by default they are encoded here."""
    if "diffusion pools" not in ctx:
        t0, P = time.time(), lm_pools(args, ctx)
        rec = {f: reconstruct(ctx, P[f]["ids"]) for f in (17, 25)}
        lat = latents() if latents else clip_latents(ctx, {f: p["specs"] for f, p in P.items()})
        ctx["diffusion pools"] = {f: dict(P[f], lat=lat[f], rec=rec[f]) for f in (17, 25)}
        print(f"diffusion pools: latents and reconstructed features of the 17/25-frame clips in {time.time() - t0:.1f}s")
    return ctx["diffusion pools"]


def stage_lm(args, ctx):
    P, cfg, g, (_, n, _) = lm_pools(args, ctx), lm.PRESETS["tiny"], gen(args, 5), PLAN["lm"]
    words = lm.TextEncoder.build_vocab(TEMPLATES[k].format(color=c, shape=s, direction=d)
                                       for k in range(len(TEMPLATES)) for c, s, d in SPLITS["seen"])
    torch.manual_seed(args.seed + 4)
    model, text = lm.SemanticLM(cfg), lm.TextEncoder(cfg, words)

    def loss_fn(g=g, frames=None, P=P):  # 1-segment clips, with 2- and 4-segment streams now and then
        frames = frames or (17, 17, 17, 17, 17, 17, 25, 41)[torch.randint(8, (), generator=g)]
        idx, specs, v = batch(P[frames], n if frames == 17 else n // 2, g)
        t = text_features(text, specs, g)
        return lm.lm_loss(model, P[frames]["ids"][idx], t, torch.full_like(v, 1 + (frames - 1) // 4), v)
    fit("lm", args, {"model": model, "text": text}, loss_fn, cfg, g)
    ctx["lm"], ctx["text"] = model.eval().requires_grad_(False), text.eval().requires_grad_(False)
    with torch.no_grad():
        val = loss_fn(gen(args, 104), 17, {17: unseen(args, ctx)})
    return f"validation loss {val:.3f} per token (ln vocab = {np.log(cfg.vocab_size):.2f})"


def stage_dit(args, ctx):
    P, cfg, g, (_, n, _) = diffusion_pools(args, ctx)[17], diffusion.PRESETS["tiny"], gen(args, 6), PLAN["dit"]
    torch.manual_seed(args.seed + 5)
    model = diffusion.DiT(cfg)

    def loss_fn(g=g, P=P):
        idx, specs, _ = batch(P, n, g)
        with torch.no_grad():
            t = text_features(ctx["text"], specs, g)
        return diffusion.fm_loss(model, P["lat"][idx], t, generator=g)
    fit("dit", args, {"model": model}, loss_fn, cfg, g)
    ctx["dit"] = model.eval().requires_grad_(False)
    with torch.no_grad():
        val = loss_fn(gen(args, 105), unseen(args, ctx, latents=True))
    return f"validation flow-matching loss {val:.4f}"


def stage_control(args, ctx):
    P, g, (_, n, _) = diffusion_pools(args, ctx), gen(args, 7), PLAN["control"]
    dit = ctx["dit"].requires_grad_(False)  # the base stays frozen (paper §3.3)
    torch.manual_seed(args.seed + 6)
    net = diffusion.ControlNet.from_dit(dit).train()

    def loss_fn(g=g, stream=None):  # one batch in three continues a 25-frame clip from its clean prefix
        stream = bool(torch.rand((), generator=g) < 1 / 3) if stream is None else stream
        pool = P[25 if stream else 17]
        idx, specs, _ = batch(pool, n, g)
        with torch.no_grad():
            t = text_features(ctx["text"], specs, g)
        k = 1 if stream else 0  # window k: latent frames [2k, 2k+5), conditioned on window k's features
        x0 = pool["lat"][idx][:, :, 2 * k:2 * k + dit.cfg.frames]
        return diffusion.fm_loss(dit, x0, t, net, pool["rec"][idx][:, k], prefix=dit.cfg.prefix if stream else 0,
                                 generator=g)
    fit("control", args, {"model": net}, loss_fn, dit.cfg, g)
    ctx["control"] = net.eval()
    with torch.no_grad():  # one fixed batch of unseen clips and noise: the branch's loss, and the base's alone
        U = unseen(args, ctx, latents=True)
        idx, specs, _ = batch(U, n, gen(args, 106))
        x0, t = U["lat"][idx], text_features(ctx["text"], specs, None, 0)
        val = diffusion.fm_loss(dit, x0, t, net, U["rec"][idx][:, 0], generator=gen(args, 107))
        base = diffusion.fm_loss(dit, x0, t, generator=gen(args, 107))
    return f"validation flow-matching loss {val:.4f} (the base alone on the same clips and noise: {base:.4f})"


# ---------------------------------------------------------------------------- evaluation
def evaluate(args, seeds=2, long_clips=10):
    """Judge clips for every combination (canonical template; `seeds` clips per seen combination and
    twice that per held-out one, speeds spread over the range) from the full pipeline and from the base
    DiT alone, plus long streamed clips."""
    p, rows, shown, t0 = sample.load_pipeline(args.out), {}, [], time.time()
    for name, baseline in (("LanDiff: LM + ControlNet", False), ("base DiT alone", True)):
        for split, combos in SPLITS.items():
            specs = [dict(zip(("color", "shape", "direction"), c)) for c in combos
                     for _ in range(seeds * (1 if split == "seen" else 2))]
            v = torch.linspace(*V_RANGE, len(specs))[torch.randperm(len(specs), generator=gen(args, 8))]
            video = sample.generate_video(p, captions(specs, None, 0), 17, v, seed=args.seed, steps=args.euler_steps,
                                          baseline=baseline)
            got = [judge_clip(x) for x in video.numpy()]
            rows[(name, split)] = {k: accuracy(got, specs, (k,)) for k in ("color", "shape", "direction")}
            rows[(name, split)]["all"] = accuracy(got, specs)
            n = 5 if split == "seen" else 3  # clips of each split for the picture
            shown += [] if baseline else list(video[::len(video) // n][:n])
    specs = draw_clips(long_clips, gen(args, 9), 41, (0.5, 0.5), COMBOS)
    video = sample.generate_video(p, captions(specs, None, 0), 41, 0.5, seed=args.seed, steps=args.euler_steps)
    chunks = [(0, 17), (16, 25), (24, 33), (32, 41)]  # the first window, then each streamed chunk
    longs = [judge_clip(x, chunks) for x in video.numpy()]
    print(f"\nevaluation ({time.time() - t0:.0f}s): clips judged as ../shared/TOY_WORLD.md says\n"
          f"{'model':<26}{'split':<10}{'colour':>8}{'shape':>8}{'direction':>10}{'all':>8}")
    for (name, split), a in rows.items():
        print(f"{name:<26}{split:<10}" + "".join(f"{a[k]:>{w}.0%}" for k, w in (("color", 8), ("shape", 8), ("direction", 10), ("all", 8))))
    cont, breaks = np.mean([j["continuous"] for j in longs]), [b for j in longs for b in j["breaks"]]
    speeds = np.mean([j["speeds"] for j in longs if j["speeds"]] or [[np.nan] * len(chunks)], 0)  # (chunks,)
    print(f"long 41-frame clips (streamed, motion 0.5): {cont:.0%} continuous, "
          f"{accuracy(longs, specs, ('color', 'shape')):.0%} on prompt; speed per chunk "
          f"{' / '.join(f'{x:.2f}' for x in speeds)} px/frame" + "".join(
              f"\n  {b}: {breaks.count(b)} of {len(longs)}" for b in dict.fromkeys(breaks)))
    pictures(args, shown[:8], video[:4])
    return {f"{n} / {s}": a for (n, s), a in rows.items()} | {"long continuous": cont, "long speeds": list(speeds),
                                                              "long breaks": {b: breaks.count(b) for b in breaks}}


def pictures(args, clips, longs):
    """A PNG grid (clips x frames, 2x nearest) and one GIF per clip, under --out."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    for i, c in enumerate(list(clips) + list(longs)):
        imageio.mimsave(os.path.join(args.out, "samples", f"{i:02d}.gif"), list(c.numpy()), duration=125, loop=0)
    grid = torch.cat([torch.cat(list(c), 1) for c in clips], 0).numpy()  # (rows*H, T*W, 3)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(os.path.join(args.out, "samples.png"))


# ---------------------------------------------------------------------------- main
def run_stage(name, args, ctx):
    t0 = time.time()
    metric = globals()[f"stage_{name}"](args, ctx)
    print(f"{name:>9}: {metric}  [{time.time() - t0:.0f}s]")
    return dict(seconds=round(time.time() - t0, 1), metric=metric)


def _vae_process(args, threads):  # the side-by-side VAE: a fresh (spawned) process, its bar on line 1
    global BAR
    BAR = 1
    torch.set_num_threads(threads)
    return run_stage("vae", args, {})


def _latents_process(args, threads):  # queued behind the VAE: its checkpoint exists by then
    torch.set_num_threads(threads)
    return clip_latents(load_context(args.out, ("vae",)), pool_specs(args))


def recorded_seed(out):  # the --seed that trained out's checkpoints (the first stage found), else 0
    names = [n for n in STAGE_NAMES if os.path.exists(os.path.join(out, f"{n}.pt"))]
    return int(sample.load_checkpoint(os.path.join(out, f"{names[0]}.pt"), names[0]).get("seed", 0)) if names else 0


def load_context(out, stages):
    """Trained stages from their checkpoints, under the names the stage functions use."""
    p = sample.load_pipeline(out, stages=stages)
    feats = tokenizer.FrozenPatchFeatures(p.tok.cfg) if p.tok else None
    return dict(vae=p.vae, tok=p.tok, feats=feats, lm=p.lm, text=p.text, dit=p.dit)


def side_by_side(args, ctx, report):
    """VAE, then the training clips' latents, in a second process; tokenizer, the clips' tokens, LM, then
    the clips' reconstructed features here; each on half the cores. On 2 cores this is ~1.5x faster than
    one after the other: the VAE runs only 1.4x faster on two threads than on one (tokenizer, LM: 1.8x)."""
    threads, half = torch.get_num_threads(), max(1, torch.get_num_threads() // 2)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_vae_process, args, half)
        torch.set_num_threads(half)
        try:
            report["tokenizer"] = run_stage("tokenizer", args, ctx)
            lat = pool.submit(_latents_process, args, half)  # one worker: runs once the VAE is done
            report["lm"] = run_stage("lm", args, ctx)
            diffusion_pools(args, ctx, lat.result)  # (a failure in the other process raises here)
        finally:
            torch.set_num_threads(threads)
        report.update(vae=job.result(), **{k: report.pop(k) for k in ("tokenizer", "lm")})
    ctx["vae"] = load_context(args.out, ("vae",))["vae"]  # trained in the other process; validation encodes with it


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/tiny", help="checkpoint directory (default out/tiny)")
    ap.add_argument("--stage", choices=STAGE_NAMES + ["eval"], help="run one stage (earlier ones must exist)")
    ap.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    ap.add_argument("--seed", type=int, help="default 0; with --stage eval or --resume, the seed --out was trained with")
    ap.add_argument("--steps", type=int, default=0, help="cap every stage at this many steps (quick looks, tests)")
    ap.add_argument("--eval-seeds", type=int, default=2, help="clips per seen combination (x2 per held-out one)")
    ap.add_argument("--euler-steps", type=int, default=6, help="denoising steps per eval clip (judged as 10, 25, 50)")
    args = ap.parse_args(argv)
    if args.seed is None:  # re-evaluating or resuming a --seed 1 run must not quietly switch to seed 0's noise
        args.seed = recorded_seed(args.out) if args.stage == "eval" or args.resume else 0
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start, ctx, report = time.time(), {}, {}
    todo = STAGE_NAMES if args.stage is None else [] if args.stage == "eval" else [args.stage]
    if todo and NEEDS[todo[0]]:  # one stage: load the stages it stands on
        ctx.update(load_context(args.out, NEEDS[todo[0]]))
    if todo == STAGE_NAMES:
        side_by_side(args, ctx, report)
        todo = todo[3:]
    for name in todo:
        report[name] = run_stage(name, args, ctx)
    if args.stage in (None, "eval"):
        t0 = time.time()
        report["eval"] = evaluate(args, args.eval_seeds)
        report["eval"]["seconds"] = round(time.time() - t0, 1)
    total = time.time() - t_start
    print(f"total {total:.0f}s: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in report.items())
          + (" (vae beside tokenizer + lm)" if args.stage is None else ""))
    if args.stage is None:
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(dict(report, total_seconds=round(total, 1)), f, indent=1, default=float)
    return report


if __name__ == "__main__":
    main()
