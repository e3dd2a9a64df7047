"""tools/make_picture.py: the README's picture, clips from trained checkpoints with their prompts on them.

    python tools/make_picture.py                      # out/tiny -> assets/samples.png
    python tools/make_picture.py --ckpt out/v2 --out /tmp/s.png

One row per prompt: every second frame of a 17-frame clip from the LanDiff pipeline, then the same
prompt from the plain text->DiT baseline (the base DiT alone), then one long 41-frame clip streamed
window by window (every fourth frame). Held-out colour-shape pairs (never rendered for training) are
marked. Each row's verdict comes from world.py's judge, so the picture cannot claim more than the
numbers do.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python tools/make_picture.py`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import sample  # noqa: E402
import world  # noqa: E402

PROMPTS = ["a red circle moving left", "a green square moving up", "a blue triangle moving right",
           "a magenta triangle moving down", "a yellow triangle moving left", "a cyan circle moving up",
           "a magenta square moving right"]
ZOOM = 3  # nearest-neighbour upscaling of the 32x32 frames, so edges stay hard
LABEL_W = 330  # pixels of the label column


def row_image(frames, label, font):
    """uint8 (T, H, W, 3) -> one labelled strip: the label on the left, the frames side by side."""
    strip = np.concatenate(list(frames), axis=1)  # (H, T*W, 3)
    strip = Image.fromarray(strip).resize((strip.shape[1] * ZOOM, strip.shape[0] * ZOOM), Image.NEAREST)
    row = Image.new("RGB", (LABEL_W + strip.width, strip.height + 4), (255, 255, 255))
    row.paste(strip, (LABEL_W, 2))
    ImageDraw.Draw(row).multiline_text((6, 8), label, fill=(0, 0, 0), font=font, spacing=4)
    return row


def spec_of(prompt, motion):
    """An evaluation prompt ("a {color} {shape} moving {direction}") -> the spec world.verdict reads."""
    _, color, shape, _, direction = prompt.split()
    return dict(color=color, shape=shape, direction=direction, v=motion)


def judged(clip, spec):
    """world.py's judge on one clip -> a short line: "right yes, strict no, on speed no"."""
    rules = world.verdict(world.judge_clip(clip.numpy()), spec)
    return ", ".join(f"{label} {'yes' if rules[rule] else 'no'}"
                     for rule, label in (("right", "right"), ("strict", "strict"), ("speed", "on speed")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="out/tiny", help="checkpoint folder (default out/tiny)")
    ap.add_argument("--out", default="assets/samples.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--motion-score", type=float, default=0.9)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    p = sample.load_pipeline(a.ckpt)
    font = ImageFont.load_default(size=15)
    rows = []
    for prompt in PROMPTS:
        spec = spec_of(prompt, a.motion_score)
        held = " (held out)" if (spec["color"], spec["shape"]) in world.HELD_OUT else ""
        for name, baseline in (("LanDiff", False), ("text->DiT baseline", True)):
            clip = sample.generate_video(p, [prompt], frames=17, motion=a.motion_score, seed=a.seed,
                                         baseline=baseline)[0]
            rows.append(row_image(clip[::2], f"{prompt}{held}\n{name}, {judged(clip, spec)}", font))
    long_prompt = PROMPTS[0]
    clip = sample.generate_video(p, [long_prompt], frames=41, motion=a.motion_score, seed=a.seed)[0]
    rows.append(row_image(clip[::4], f"{long_prompt}, 41 frames streamed\nLanDiff, "
                                     f"{judged(clip, spec_of(long_prompt, a.motion_score))}", font))
    width = max(r.width for r in rows)
    picture = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for r in rows:
        picture.paste(r, (0, top))
        top += r.height
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(a.out)
    print(f"wrote {a.out}: {len(rows)} rows, {picture.width}x{picture.height}")


if __name__ == "__main__":
    main()
