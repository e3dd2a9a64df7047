"""tools/diagnose.py: where does a trained pipeline lose the clip? world.py's judge after each stage.

    python tools/diagnose.py                      # the checkpoints in out/tiny
    python tools/diagnose.py --ckpt out/v2 --clips 64

The same seen-pair clips (17 frames, each prompt at motion 0.5 and at 1.25) pass through the pipeline
one stage at a time, and each row replaces one learned stage by the truth, so a drop between rows
belongs to the stage in between:

    semantic rows: 5 frames (RGB 0, 4, ..., 16) read back from semantic features. The tiny feature
    source is a square, invertible patch projection (tokenizer.FrozenPatchFeatures), so features turn
    back into pixels exactly and the judge can fit the motion law to them at t = 0, 4, ..., 16.
      features        the clip's own features (a check of the read-back: every clip passes)
      tokenizer       its features through the tokenizer: encode, quantize, decode
      LM              features decoded from the LM's ids, written from the prompt and motion score
    video rows: 17 frames through the VAE decoder, judged as train_tiny.py's evaluation judges them.
      VAE             the clip through the VAE and back (the ceiling of every row below)
      clip's tokens   the clip's own token ids -> DiT + ControlNet -> VAE: LanDiff with a perfect LM
      LanDiff         the whole pipeline from the prompt
      base DiT        the plain text-to-video baseline

Columns: direction (the fitted one is the prompt's), speed (fitted within 0.15 px/frame of the motion score
asked), on path (residual <= 1 px), and for the video rows right (colour, shape and direction: the
evaluation's accuracy) and strict (world.py's rule); last, the mean fitted speed at motion 0.5 and at 1.25:
two equal numbers mean the motion score is ignored. (Colour and shape are not judged on the semantic rows:
features decoded from tokens read back as blurred pixels, and the branch takes colour and shape from the
prompt too.)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python tools/diagnose.py`

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lm  # noqa: E402
import sample  # noqa: E402
import tokenizer  # noqa: E402
import world  # noqa: E402

SPEEDS = (0.5, 1.25)  # the speed-following rule's two motion scores
COLUMNS = (("direction", 11), ("speed", 8), ("path", 9), ("right", 8), ("strict", 8))  # row key, printed width


def features_to_frames(features, patch_features):
    """Semantic features (B, T, C, h, w) -> uint8 frames (B, T, H, W, 3): FrozenPatchFeatures undone."""
    cfg = patch_features.cfg
    B, T, C, h, w = features.shape
    unproject = torch.linalg.inv(patch_features.weight.reshape(C, -1))  # (3·p·p, C): square at tiny size
    patches = (unproject @ features.permute(0, 1, 3, 4, 2).unsqueeze(-1)).squeeze(-1)  # (B, T, h, w, 3·p·p)
    pixels = patches.view(B, T, h, w, 3, cfg.patch, cfg.patch).permute(0, 1, 4, 2, 5, 3, 6)  # (B, T, 3, h, p, w, p)
    rgb = pixels.reshape(B, T, 3, h * cfg.patch, w * cfg.patch) - 1  # the features were measured from black
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2)


def judge_semantic(frames, specs, stride):
    """uint8 (B, T, H, W, 3) semantic frames, RGB frames 0, stride, 2·stride, ... -> the row's shares."""
    rows = []
    for clip, spec in zip(frames.numpy(), specs):
        found = [(i * stride, f) for i, f in enumerate(world.judge_frames(clip)) if f is not None]
        if len(found) < 2:
            rows.append(dict(direction=False, speed=False, path=False, fitted=0.0))
            continue
        t = np.array([i for i, _ in found], dtype=np.float64)
        fits = world.fit_motion(t, np.array([f[2:] for _, f in found]))
        direction = min(fits, key=lambda d: fits[d][2])
        speed, _, residual = fits[direction]
        rows.append(dict(direction=direction == spec["direction"], speed=abs(speed - spec["v"]) <= world.SPEED_TOLERANCE,
                         path=residual <= world.MAX_RESIDUAL, fitted=speed))
    return rows


def to_uint8(video):  # the VAE's (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), as sample.py writes clips
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1)


def judge_video(video, specs):
    rows = []
    for clip, spec in zip(np.asarray(video), specs):
        judged = world.judge_clip(clip)
        verdict = world.verdict(judged, spec)
        rows.append(dict(direction=judged["direction"] == spec["direction"], speed=verdict["speed"],
                         path=judged["residual"] <= world.MAX_RESIDUAL, right=verdict["right"], strict=verdict["strict"],
                         fitted=judged["speed"]))
    return rows


def report(name, rows, specs):
    shares = "".join(f"{np.mean([r[k] for r in rows]):>{w}.0%}" if k in rows[0] else " " * w for k, w in COLUMNS)
    fitted = [np.mean([r["fitted"] for r, s in zip(rows, specs) if s["v"] == v]) for v in SPEEDS]
    print(f"{name:<16}{shares}{fitted[0]:>9.2f} /{fitted[1]:>5.2f}")


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="out/tiny", help="checkpoint folder from train_tiny.py (default out/tiny)")
    ap.add_argument("--clips", type=int, default=32, help="prompts, each at motion 0.5 and 1.25 (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6, help="Euler steps per clip (train_tiny.py's evaluation: 6)")
    args = ap.parse_args(argv)
    p = sample.load_pipeline(args.ckpt)
    if p.tok.cfg.quantizer != "fsq" or p.tok.cfg.feat_dim != 3 * p.tok.cfg.patch ** 2:
        raise SystemExit("error: the semantic rows read features back as pixels, which only the tiny preset's square "
                         f"patch projection allows (feat_dim = 3·patch²), got feat_dim {p.tok.cfg.feat_dim}")
    drawn = world.draw_clips(args.clips, torch.Generator().manual_seed(args.seed))
    specs = [dict(s, v=v) for s in drawn for v in SPEEDS]
    video = world.render(specs)  # uint8 (B, 17, H, W, 3)
    x = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, H, W) in [-1, 1]
    patch_features = tokenizer.FrozenPatchFeatures(p.tok.cfg)
    stride = p.tok.cfg.time_stride
    features = patch_features(x)
    reconstructed = p.tok.decode(p.tok.encode(features))  # the tokenizer round trip: also the DiT's oracle condition
    prompts = world.captions(specs, None, 0)
    motion = torch.tensor([s["v"] for s in specs])
    text = p.text(p.text.tokenize(prompts))
    lm_ids = lm.generate(p.lm, text, features.shape[1], motion, guidance=3.0, temperature=0.6,  # sample.py's defaults
                         generator=torch.Generator().manual_seed(args.seed))
    print(f"{len(specs)} seen clips, {video.shape[1]} frames; judged by world.py\n"
          f"{'':<16}{'direction':>11}{'speed':>8}{'on path':>9}{'right':>8}{'strict':>8}   speed at {SPEEDS[0]} / {SPEEDS[1]}")
    for name, feats in (("features", features), ("tokenizer", reconstructed), ("LM", p.tok.decode(lm_ids))):
        report(name, judge_semantic(features_to_frames(feats, patch_features), specs, stride), specs)
    report("VAE", judge_video(to_uint8(p.vae.decode(p.vae.encode(x)[0])), specs), specs)
    dit_encoder = p.dit_text_encoder()  # as sample.generate_video conditions the DiT
    latents = sample.denoise(p, dit_encoder(dit_encoder.tokenize(prompts)), lambda k, so_far: reconstructed, windows=1, steps=args.steps,
                             guidance=2.0, generator=torch.Generator().manual_seed(args.seed), progress=None)  # sample.py's
    report("clip's tokens", judge_video(to_uint8(p.vae.decode(latents / p.vae.cfg.scale_factor)), specs), specs)
    for name, baseline in (("LanDiff", False), ("base DiT", True)):
        out = sample.generate_video(p, prompts, video.shape[1], motion, seed=args.seed, steps=args.steps, baseline=baseline)
        report(name, judge_video(out, specs), specs)


if __name__ == "__main__":
    main()
