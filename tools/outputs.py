"""Output files: sample.py's prompts and each clip's path, checked before any work; train_tiny.py's sample clips."""
import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import torch
from PIL import Image


def outputs(args):
    """-> the prompts and each clip's path, all checked before any work."""
    if args.prompts_file and not args.out_dir:
        raise SystemExit("error: --prompts-file needs --out-dir (a folder for 0000.gif, ... and manifest.json)")
    if not args.prompts_file and not args.out.endswith((".gif", ".mp4")):
        raise SystemExit(f"error: --out must end in .gif or .mp4, got {args.out}")
    if args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1 (Euler steps per diffusion window), got {args.steps}")
    prompts = [args.prompt] if not args.prompts_file else \
        [s.strip() for s in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if s.strip()]
    if not prompts:
        raise SystemExit(f"error: --prompts-file {args.prompts_file} is empty; write one prompt per line")
    folder = args.out_dir if args.prompts_file else os.path.dirname(args.out) or "."
    try:  # the folder (made if missing) must take our files
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write into {folder!r} ({e.strerror or e}); choose a writable folder") from None
    if args.prompts_file:
        return prompts, [os.path.join(folder, f"{i:04d}.gif") for i in range(len(prompts))]
    if args.out.endswith(".mp4"):
        try:
            import imageio_ffmpeg
            imageio_ffmpeg.get_ffmpeg_exe()
        except Exception:  # not installed, or no ffmpeg binary for this platform
            print(f"note: ffmpeg is not available (pip install imageio-ffmpeg), writing {args.out[:-4]}.gif instead")
            return prompts, [args.out[:-4] + ".gif"]
    return prompts, [args.out]


def save_samples(folder, short, long):
    """uint8 clips (N, T, H, W, 3) -> folder/samples/NN.gif, one per clip, and folder/samples.png, the short ones in a grid."""
    os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    for i, clip in enumerate(list(short) + list(long)):
        imageio.mimsave(os.path.join(folder, "samples", f"{i:02d}.gif"), list(clip.numpy()), duration=125, loop=0)
    grid = torch.cat([torch.cat(list(c), 1) for c in short], 0).numpy()  # (clips*H, T*W, 3)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(os.path.join(folder, "samples.png"))
