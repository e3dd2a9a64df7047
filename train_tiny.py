"""train_tiny.py: the whole LanDiff pipeline learns a toy world on a laptop CPU.

The world: Moving Shapes v2 (world.py, its docstring the contract). The stages train in the order their data
depends on (arXiv 2503.04606 §3-4), in two chains on half the cores each: (1) VAE, then (4) base DiT on its own
frozen text encoder (text -> a window of latents, from noise or continuing a clean prefix), in a second process; beside
them (2) tokenizer, then the clips' ids, one segment per diffusion window, and (3) LM + its text encoder on them,
given each clip's frames and speed (motion_score). Then (5) ControlNet branch, base frozen, on each window's
reconstructed features; world.py judges LanDiff beside the base DiT alone (plain text-to-video, same clips).

    python train_tiny.py                          # everything, about 17 minutes on 2 CPU cores
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

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffusion
import lm
import sample
import tokenizer
import vae
import world
from tools.outputs import save_samples  # (GIF and PNG files: nothing to teach)

# (steps, clips per batch, peak learning rate) per stage; how they were chosen: docs/EXPERIMENTS.md
PLAN = dict(vae=(1800, 6, 6e-3), tokenizer=(1600, 16, 1.5e-3), lm=(2300, 16, 1e-3), dit=(2200, 16, 8e-3), control=(1000, 16, 8e-3))
NEEDS = dict(vae=[], tokenizer=[], lm=["tokenizer"], dit=["vae"], control=["vae", "tokenizer", "dit"])
POOL = {17: 6000, 25: 900, 41: 500}  # frames -> training clips (speeds over the whole range), one set for all stages
STREAM = 1 / 3  # share of the DiT's and the branch's batches that continue a clean prefix
WINDOW = diffusion.PRESETS["tiny"]  # WINDOW.frames latent frames, the first WINDOW.prefix clean when streaming
STRIDE = WINDOW.frames - WINDOW.prefix  # latent (= semantic) frames from one window to the next: 2 (8 RGB frames)
SAVE_EVERY = 30  # seconds between checkpoints of a running stage
CHUNK = 16  # clips per forward pass when encoding the pools: a small batch's activations stay in the CPU's cache
WORDS = lm.TextEncoder.build_vocab(t.format(color=c, shape=s, direction=d) for t in world.TEMPLATES for c, s, d in world.SPLITS["seen"])


# ---------------------------------------------------------------------------- training loop, data
def fit(name, args, modules, loss_fn, cfg, g, finish=None, beside=None):
    """AdamW, warm-up, cosine decay over the PLAN's steps; atomic checkpoints every 30 s and at the end (with the config
    finish() returns); once beside() (the other process is done) is true, its cores join. --resume loads a finished stage, continues one."""
    steps, _, lr = PLAN[name]
    steps = min(steps, args.steps or steps)
    path, step = os.path.join(args.out, f"{name}.pt"), 0
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)  # fused: one kernel
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    if args.resume and os.path.exists(path):
        ck = sample.load_checkpoint(path, name)
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        if ck["done"]:
            print(f"{name}: done earlier, loaded {path}")
            return ck
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        g.set_state(ck["gen"])
        torch.set_rng_state(ck["rng"])
        step = ck["step"]
        print(f"{name}: resuming at step {step}/{steps}")

    def save(done, n):
        sample.save_checkpoint(path, stage=name, config=dataclasses.asdict(cfg), done=done, step=n, seed=args.seed,
                               **{k: m.state_dict() for k, m in modules.items()}, optim=opt.state_dict(),
                               sched=sched.state_dict(), gen=g.get_state(), rng=torch.get_rng_state())
    line = 0 if multiprocessing.parent_process() is None else 1  # the other process draws its bar below ours
    bar = tqdm(range(step, steps), desc=f"{name:>9}", initial=step, total=steps, ncols=90, position=line)  # (closes itself)
    last, ema = time.time(), None
    for step in bar:
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise SystemExit(f"error: {name} loss is {loss.item()} at step {step}; the last good state is in {path} "
                             f"(continue with --stage {name} --resume, or lower the learning rate)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if beside is not None and beside() and torch.get_num_threads() < args.threads:  # the other chain is done: its cores join
            torch.set_num_threads(args.threads)
        if time.time() - last > SAVE_EVERY:
            save(False, step + 1)
            last = time.time()
    cfg = finish() if finish else cfg  # (save reads cfg when called)
    save(True, steps)


def gen(args, k):  # one data stream per purpose, so --stage X sees the same data as a full run
    return torch.Generator().manual_seed(args.seed * 1000 + k)


def clips(specs):  # clip specs -> float video (N, 3, T, H, W) in [-1, 1], the VAE's layout
    return world.render(specs).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def batch(pool, n, g, text):  # n random clips of a pool: indices, speeds, caption features
    idx = torch.randint(len(pool["specs"]), (n,), generator=g)
    specs = [pool["specs"][i] for i in idx.tolist()]
    return idx, torch.tensor([s["v"] for s in specs], dtype=torch.float32), text(text.tokenize(world.captions(specs, g)))


@torch.no_grad()
def encode(ctx, specs, what):
    """Clips, CHUNK at a time -> "lat": VAE latents x scale (N, C, T_lat, h, w), or "ids": the LM's stream,
    each diffusion window's token ids (N, K * n_tokens); window k covers semantic frames [k·STRIDE, +frames)."""
    out = []
    for i in range(0, len(specs), CHUNK):
        x = clips(specs[i:i + CHUNK])
        if what == "lat":
            out.append(ctx["vae"].encode(x)[0] * ctx["vae"].cfg.scale_factor)
            continue
        feats, n = tokenizer.FrozenPatchFeatures(ctx["tok"].cfg)(x), ctx["tok"].cfg.frames  # (b, T_sem, C, h, w)
        windows = torch.stack([feats[:, k:k + n] for k in range(0, feats.shape[1] - n + 1, STRIDE)], 1)
        out.append(ctx["tok"].encode(windows.flatten(0, 1)).view(len(x), -1))  # (b*K, n_tokens) -> (b, K*n_tokens)
    return torch.cat(out)


@torch.no_grad()
def pools(args, ctx, split="train", lat=None):
    """The training clips by length, or ("unseen") 64 fresh 17-frame clips (8 under --steps) for validation, made once
    per run; given the tokenizer, their ids and each window's reconstructed features (N, K, frames, C, h, w), the
    ControlNet's condition; given lat (latents by length, or True: encode here), their latents."""
    if split not in ctx:  # (under --steps: 8 clips of each length, a quick look)
        sizes = {f: min(8, n) if args.steps else n for f, n in POOL.items()} if split == "train" else {17: 8 if args.steps else 64}
        g = gen(args, 3 if split == "train" else 108)
        ctx[split] = {f: dict(specs=world.draw_clips(n, g, f)) for f, n in sizes.items()}
    if ctx.get("tok") is not None and "ids" not in ctx[split][17]:
        for d in ctx[split].values():
            d["ids"] = encode(ctx, d["specs"], "ids")
            rec = [ctx["tok"].decode(b.reshape(-1, ctx["tok"].cfg.n_tokens)).unflatten(0, (len(b), -1)) for b in d["ids"].split(CHUNK)]
            d["rec"] = torch.cat(rec)
        print(f"{split:>9}: {' + '.join(str(len(d['specs'])) for d in ctx[split].values())} clips tokenized")
    if lat is not None and "lat" not in ctx[split][17]:
        for f, d in ctx[split].items():
            d["lat"] = encode(ctx, d["specs"], "lat") if lat is True else lat[f]
    return ctx[split]


def window_batch(ctx, data, n, g, stream=None):
    """A diffusion batch. Streaming (with probability STREAM): window k >= 1 of a 25- or 41-frame clip with
    its first WINDOW.prefix latent frames clean, as sample.py continues a long clip; else window 0 of a
    17-frame clip. -> latents (n, C, WINDOW.frames, h, w), the DiT's caption features, the window's features, prefix."""
    stream = bool(torch.rand((), generator=g) < STREAM) if stream is None else stream
    pool = data[(25, 41)[int(torch.randint(2, (), generator=g))]] if stream else data[17]
    idx, _, text = batch(pool, n, g, ctx["text_dit"])
    windows = 1 + (pool["lat"].shape[2] - WINDOW.frames) // STRIDE
    k = int(torch.randint(1, windows, (), generator=g)) if stream else 0
    x0 = pool["lat"][idx][:, :, k * STRIDE:k * STRIDE + WINDOW.frames]
    return x0, text, pool["rec"][idx][:, k] if "rec" in pool else None, WINDOW.prefix if stream else 0


# ---------------------------------------------------------------------------- the stages
def stage_vae(args, ctx):
    cfg, g, (_, n, _) = vae.PRESETS["tiny"], gen(args, 1), PLAN["vae"]
    model = vae.VAE(cfg)
    # object pixels count 10x: they cover ~7% of a frame, and plain MSE learns the black background first (DESIGN §7)

    def loss_fn():  # 5-frame clips hold both causal cases (the lone first frame, then 4 frames per latent frame)
        x = clips(world.draw_clips(n, g, 5))
        near = F.max_pool3d((x.amax(1, keepdim=True) > -1).float(), (1, 5, 5), 1, (0, 2, 2))  # object + 2 px
        return vae.vae_loss(model, x, weight=1 + 9 * near, l1_weight=1.0)
    specs = world.draw_clips(8 if args.steps else 64, gen(args, 101))  # the check's clips and the latent scale's; 8: a quick look
    x = clips(specs)

    def scale():  # latents x scale have unit std, the scale the DiT expects (LDM); kept in the checkpoint
        with torch.no_grad():
            model.cfg = dataclasses.replace(cfg, scale_factor=round(1 / model.encode(x)[0].std().item(), 5))
        return model.cfg
    ck = fit("vae", args, {"model": model}, loss_fn, cfg, g, finish=scale)
    model.cfg = vae.VAEConfig(**ck["config"]) if ck else model.cfg
    ctx["vae"] = model.eval().requires_grad_(False)
    y = model.decode(model.encode(x)[0])
    judged = world.score(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1), specs)
    return (f"reconstruction MSE {(y - x).square().mean():.4f}, judged right {judged['right']:.0%}, "
            f"strict {judged['strict']:.0%}; latent scale {model.cfg.scale_factor}")


def stage_tokenizer(args, ctx):
    cfg, g, (_, n, _) = tokenizer.PRESETS["tiny"], gen(args, 2), PLAN["tokenizer"]
    model, feats = tokenizer.SemanticTokenizer(cfg), tokenizer.FrozenPatchFeatures(cfg)
    fit("tokenizer", args, {"model": model}, lambda: tokenizer.tokenizer_loss(model, feats(clips(world.draw_clips(n, g)))), cfg, g)
    ctx["tok"] = model.eval().requires_grad_(False)
    with torch.no_grad():
        f = feats(clips(world.draw_clips(32 if args.steps else 256, gen(args, 102))))  # 32 under --steps: a quick look
        loss = tokenizer.tokenizer_loss(model, f)
        ids = model.encode(f)
    used, perplexity = tokenizer.codebook_usage(ids, cfg.codebook_size)
    return f"feature MSE {loss:.4f} (feature variance {f.var():.4f}), codes used {used:.0%}, perplexity {perplexity:.0f}"


def stage_lm(args, ctx):
    data, cfg, g, (_, n, _) = pools(args, ctx), lm.PRESETS["tiny"], gen(args, 5), PLAN["lm"]
    model, text = lm.SemanticLM(cfg), lm.TextEncoder(cfg, WORDS)

    def loss_fn(g=g, frames=None, data=data):  # half the batches 1-segment clips, half 2- and 4-segment streams
        frames = frames or (17, 17, 17, 17, 25, 25, 41, 41)[torch.randint(8, (), generator=g)]
        idx, v, t = batch(data[frames], n if frames == 17 else n // 2, g, text)
        semantic_frames = torch.full_like(v, 1 + (frames - 1) // 4)  # the `frames` micro-condition
        return lm.lm_loss(model, data[frames]["ids"][idx], t, semantic_frames, v)
    fit("lm", args, {"model": model, "text": text}, loss_fn, cfg, g, beside=ctx.get("beside"))
    ctx["lm"], ctx["text"] = model.eval().requires_grad_(False), text.eval().requires_grad_(False)
    with torch.no_grad():
        val = loss_fn(gen(args, 104), 17, pools(args, ctx, "unseen"))
    return f"validation loss {val:.3f} per token (ln vocab = {np.log(cfg.vocab_size):.2f})"


def stage_dit(args, ctx):
    data, g, (_, n, _) = pools(args, ctx, "train", True), gen(args, 6), PLAN["dit"]
    model, text = diffusion.DiT(WINDOW), lm.TextEncoder(lm.PRESETS["tiny"], WORDS).requires_grad_(False)
    ctx["text_dit"] = text  # its own, frozen as the paper's T5 (here at its random start): the base is text-to-video

    def loss_fn():  # with streaming batches: the base DiT alone continues long clips too
        x0, text, _, prefix = window_batch(ctx, data, n, g)
        return diffusion.fm_loss(model, x0, text, prefix=prefix, generator=g)
    fit("dit", args, {"model": model, "text": text}, loss_fn, WINDOW, g, beside=ctx.get("beside"))
    ctx["dit"], ctx["text_dit"] = model.eval().requires_grad_(False), text.eval().requires_grad_(False)
    return f"validation flow-matching loss {validation(args, ctx):.4f}"


def stage_control(args, ctx):
    if ctx["text_dit"] is None:  # a dit.pt written before the DiT read a text encoder of its own
        raise SystemExit(f"error: {os.path.join(args.out, 'dit.pt')} has no text encoder of its own; re-train it with --stage dit")
    data, g, (_, n, _) = pools(args, ctx, "train", True), gen(args, 7), PLAN["control"]
    dit, net = ctx["dit"].requires_grad_(False), diffusion.ControlNet.from_dit(ctx["dit"]).train()  # the base stays frozen (paper §3.3)

    def loss_fn():
        x0, text, sem, prefix = window_batch(ctx, data, n, g)
        return diffusion.fm_loss(dit, x0, text, net, sem, prefix=prefix, generator=g)
    fit("control", args, {"model": net}, loss_fn, dit.cfg, g)
    ctx["control"] = net.eval()
    return f"validation flow-matching loss {validation(args, ctx, net):.4f} (the base alone: {validation(args, ctx):.4f})"


@torch.no_grad()
def validation(args, ctx, branch=None):  # flow-matching loss on one fixed batch of unseen clips and noise
    x0, text, sem, _ = window_batch(ctx, pools(args, ctx, "unseen", True), PLAN["dit"][1], gen(args, 105), stream=False)
    return diffusion.fm_loss(ctx["dit"], x0, text, branch, None if branch is None else sem, generator=gen(args, 107))


# ---------------------------------------------------------------------------- evaluation
def evaluate(args, per_combo=2):
    """Both models sample, world.py judges: every combination in template 1 (per_combo clips per seen one,
    twice that per held-out one, at motion 0.5, 0.75, 1.0, 1.25 in turn); 12·per_combo seen prompts, each
    at motion 0.5 and 1.25 (speed-following); 4·per_combo prompts of any pair as long clips at 0.5 and 1.0."""
    t0, pipe, g = time.time(), sample.load_pipeline(args.out), gen(args, 8)
    prompts, report, shown = {}, {}, []  # name -> (frames, prompt specs); model -> name -> scores; LanDiff's clips
    for split, combos in world.SPLITS.items():
        specs = [dict(zip(("color", "shape", "direction"), c)) for c in combos for _ in range(per_combo * (1 + (split != "seen")))]
        order = torch.randperm(len(specs), generator=g).tolist()
        prompts[split] = (world.FRAMES, [dict(s, v=(0.5, 0.75, 1.0, 1.25)[i % 4]) for s, i in zip(specs, order)])
    prompts["speed"] = (world.FRAMES, [dict(s, v=v) for s in world.draw_clips(12 * per_combo, g) for v in (0.5, 1.25)])
    prompts["long"] = (world.LONG_FRAMES, [dict(s, v=v) for s in world.draw_clips(4 * per_combo, g, combos=world.COMBOS) for v in (0.5, 1.0)])
    for name, baseline in (("LanDiff", False), ("base DiT", True)):
        videos = {key: sample.generate_video(pipe, world.captions(specs, None, 0), frames, torch.tensor([s["v"] for s in specs]),
                                             seed=args.seed, steps=args.euler_steps, baseline=baseline)
                  for key, (frames, specs) in prompts.items()}
        report[name] = {key: world.score(video, prompts[key][1]) for key, video in videos.items()}
        shown = shown or [videos["seen"][::15 * per_combo], videos["held-out"][::12 * per_combo], videos["long"][:2]]
    rows = {"accuracy seen": ("seen", "right"), "accuracy held-out": ("held-out", "right"), "strict seen": ("seen", "strict"),
            "strict held-out": ("held-out", "strict"), "speed-following": ("speed", "speed"), "long clips passing": ("long", "strict")}
    report["summary"] = {row: {m: report[m][key][rule] for m in ("LanDiff", "base DiT")} for row, (key, rule) in rows.items()}
    print(f"\nevaluation ({time.time() - t0:.0f}s), judged by world.py\n{'':<20}{'LanDiff':>10}{'base DiT':>10}")
    for row, by_model in report["summary"].items():
        print(f"{row:<20}" + "".join(f"{x:>10.0%}" for x in by_model.values()))
    for m in ("LanDiff", "base DiT"):  # why: the speeds it moves at, and the checks its long clips fail
        print(f"{m}: fitted speed at motion 0.5 / 1.25: {' / '.join(f'{x:.2f}' for x in report[m]['speed']['fitted_speed'].values())}; "
              f"long clips fail on {', '.join(f'{b} {n}' for b, n in report[m]['long']['breaks'].items() if n) or 'nothing'}")
    save_samples(args.out, torch.cat(shown[:2]), shown[2])  # LanDiff's clips: a GIF each, the short ones in a grid
    return dict(report, seconds=round(time.time() - t0, 1))


# ---------------------------------------------------------------------------- main
def run_stage(name, args, ctx):
    t0 = time.time()
    torch.manual_seed(args.seed + list(PLAN).index(name))  # the stage's weights: the same in a full run and alone
    metric = dict(vae=stage_vae, tokenizer=stage_tokenizer, lm=stage_lm, dit=stage_dit, control=stage_control)[name](args, ctx)
    print(f"{name:>9}: {metric}  [{time.time() - t0:.0f}s]")
    return dict(seconds=round(time.time() - t0, 1), metric=metric)


def vae_dit_process(args, threads, lm_done):  # a fresh (spawned) process: VAE, then base DiT (every core once lm_done is set)
    torch.set_num_threads(threads)
    ctx = dict(beside=lm_done.is_set)
    report = {name: run_stage(name, args, ctx) for name in ("vae", "dit")}
    return report, {f: d["lat"] for f, d in ctx["train"].items()}  # the training clips' latents, for the branch


def recorded_seed(out):  # the --seed that trained out's checkpoints (the first stage found), else 0
    names = [n for n in PLAN if os.path.exists(os.path.join(out, f"{n}.pt"))]
    return int(sample.load_checkpoint(os.path.join(out, f"{names[0]}.pt"), names[0]).get("seed", 0)) if names else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/tiny", help="checkpoint directory (default out/tiny)")
    ap.add_argument("--stage", choices=list(PLAN) + ["eval"], help="run one stage (earlier ones must exist)")
    ap.add_argument("--resume", action="store_true", help="skip finished stages, continue an interrupted one")
    ap.add_argument("--seed", type=int, help="default 0; with --stage eval or --resume, the seed --out was trained with")
    ap.add_argument("--steps", type=int, default=0, help="cap every stage at this many steps; data and checks shrink (quick looks, tests)")
    ap.add_argument("--eval-clips", type=int, default=2, help="eval clips per seen combination (see evaluate)")
    ap.add_argument("--euler-steps", type=int, default=6, help="denoising steps per eval clip")
    args = ap.parse_args(argv)
    if args.seed is None:  # re-evaluating or resuming a --seed 1 run must not quietly switch to seed 0's noise
        args.seed = recorded_seed(args.out) if args.stage == "eval" or args.resume else 0
    os.makedirs(args.out, exist_ok=True)
    t_start, ctx, report = time.time(), {}, {}
    args.threads = torch.get_num_threads()  # all of them: fit() hands one chain's cores to the other once it is done
    if args.stage is None:  # VAE + DiT beside tokenizer + LM, half the cores each (1 thread does more work per core)
        spawn = multiprocessing.get_context("spawn")
        with spawn.Manager() as manager, ProcessPoolExecutor(1, mp_context=spawn) as pool:
            lm_done = manager.Event()
            beside = pool.submit(vae_dit_process, args, max(1, args.threads // 2), lm_done)
            ctx["beside"] = beside.done
            torch.set_num_threads(max(1, args.threads // 2))
            report.update({name: run_stage(name, args, ctx) for name in ("tokenizer", "lm")})
            lm_done.set()
            vae_dit, lat = beside.result()  # (a failure in the other process raises here)
            torch.set_num_threads(args.threads)
        report.update(vae_dit)
        ctx.update({k: m for k, m in vars(sample.load_pipeline(args.out, stages=("vae", "dit"))).items() if isinstance(m, torch.nn.Module)})
        pools(args, ctx, "train", lat)
    elif args.stage != "eval" and NEEDS[args.stage]:  # one stage: load the stages it stands on
        ctx.update(vars(sample.load_pipeline(args.out, stages=NEEDS[args.stage])))
    for name in ["control"] if args.stage is None else [] if args.stage == "eval" else [args.stage]:
        report[name] = run_stage(name, args, ctx)
    if args.stage in (None, "eval"):
        report["eval"] = evaluate(args, args.eval_clips)
    total = time.time() - t_start
    print(f"total {total:.0f}s: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in report.items())
          + (" (vae + dit beside tokenizer + lm)" if args.stage is None else ""))
    if args.stage is None:
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(dict(report, total_seconds=round(total, 1)), f, indent=1, default=float)
    return report


if __name__ == "__main__":
    main()
