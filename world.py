"""world.py: Moving Shapes, version 2, the toy world that train_tiny.py learns, and its judge.

This docstring is the world's contract; the code below renders and judges exactly this.

A clip. 17 frames (1 + 4·4: a causal VAE with 4x temporal compression gives 5 latent frames),
32x32 pixels, RGB uint8, 8 fps, pure black background. One object per clip, flat colour, hard
edges, no anti-aliasing: a pixel belongs to the object when its centre (x+0.5, y+0.5) lies inside
the shape. Shapes, of nominal size s = 10 px (r = s/2) around the centre (cx, cy):
    circle    distance from the centre <= r
    square    |dx| <= r and |dy| <= r
    triangle  apex up at (cx, cy-r), base from (cx-r, cy+r) to (cx+r, cy+r):
              inside when -r <= dy <= r and |dx| <= (dy + r)/2
Colours (exact RGB): red (220,40,40), green (40,200,60), blue (50,90,230), yellow (230,210,50),
magenta (210,60,210), cyan (50,210,210).

Motion, the law. Direction left, right, up or down; speed v px/frame uniform in [0.5, 1.25]. The
centre moves along the direction's axis only; the other coordinate stays fixed. The centre lives
in [5.5, 26.5] on both axes (so the object never leaves the frame) and bounces elastically off
those bounds, as digits do in Moving MNIST (Srivastava et al. 2015, arXiv 1502.04681):
    p(t) = reflect(p0 + sign·v·t),  reflect(p): u = (p - 5.5) mod 42; 5.5 + u if u <= 21 else 5.5 + 42 - u
The off-axis coordinate is uniform in [5.5, 26.5]; p0 is uniform among the positions that leave
at least 4 frames of travel in the prompted direction before the first bounce (distance to the
wall ahead >= 4·v), so the first frames always move the way the caption says. Any clip length
works: a long clip bounces one or more times. The paper's micro-conditions are frames (the
number of frames) and motion_score = v; both are inputs at sampling time.

Captions. One of four templates, chosen uniformly (evaluation prompts use the first):
"a {color} {shape} moving {direction}", "a {color} {shape} moves {direction}",
"{color} {shape} going {direction}", "a {shape}, {color}, moving {direction}".

Splits. The colour-shape pairs (yellow, triangle), (cyan, circle) and (magenta, square) are never
rendered for training; with the four directions they are the 12 held-out combinations, the other
60 the seen ones. Held-out accuracy measures compositional generalisation.

Judging a clip (judge_clip, then verdict against the prompt):
- A frame's object is the set of pixels whose brightest channel exceeds half of the frame's peak
  brightness (none when that peak is under 64: every palette colour peaks at 200 or more); its colour is the palette
  colour nearest to the median of its brightest half of pixels; its shape is the template with the
  best IoU placed at the object's centroid. A triangle's centroid lies r/3 below its nominal centre;
  the law is fitted to nominal centres.
- Motion: for each of the four directions, the speed and start (p0 in the bounds, with at least one
  frame of travel that way before the first bounce: a path that turns at once moves the other way
  first) whose bouncing path best matches the track of centres: mean absolute error along the axis,
  plus the off-axis coordinate's mean absolute deviation from its median. The best direction is the
  clip's direction, its speed the clip's speed, its error the clip's residual (px). Under 3 px of
  travel over the clip (speed x (frames - 1)) counts as not moving ("none").
- right (the headline accuracy): the majority colour, majority shape and the fitted direction all
  match the prompt.
- strict: right, and the object found in every frame with the prompt's colour and shape, residual
  <= 1.0 px, and no jump of the centre over 3 px between consecutive frames.
- speed: the fitted speed within 0.15 px/frame of the motion_score asked.
- A long clip is 41 frames (17 + 3 chunks of 8), streamed window by window at any motion_score in
  [0.5, 1.25]; it passes when it is strict over all 41 frames (jumps at chunk joins included).

    specs = draw_clips(8, torch.Generator().manual_seed(0))   # 8 training clips (seen pairs)
    video = render(specs)                                      # uint8 (8, 17, 32, 32, 3)
    verdict(judge_clip(video[0].numpy()), specs[0])            # {'right': True, 'strict': True, 'speed': True, ...}
"""
import numpy as np
import torch

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
          "yellow": (230, 210, 50), "magenta": (210, 60, 210), "cyan": (50, 210, 210)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) per frame, y down
HELD_OUT = {("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square")}  # never rendered for training
TEMPLATES = ("a {color} {shape} moving {direction}", "a {color} {shape} moves {direction}",
             "{color} {shape} going {direction}", "a {shape}, {color}, moving {direction}")
COMBOS = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
SPLITS = {"seen": [x for x in COMBOS if x[:2] not in HELD_OUT], "held-out": [x for x in COMBOS if x[:2] in HELD_OUT]}

SIZE = 32  # frame height and width, px
OBJECT_SIZE = 10.0  # nominal shape size s, px
LO = 5.5  # the centre's bounds on both axes: the object (r = 5) stays inside the 32 px frame
HI = 26.5
V_RANGE = (0.5, 1.25)  # speeds, px/frame
FRAMES = 17  # a clip; LONG_FRAMES: a streamed long clip (17 + 3 chunks of 8)
LONG_FRAMES = 41
LEAD_FRAMES = 4  # frames of travel in the prompted direction before the first bounce, at least
MIN_TRAVEL = 3.0  # px over the clip: less is "not moving"
MAX_RESIDUAL = 1.0  # px, the strict rule's path error
MAX_JUMP = 3.0  # px between consecutive frames, the strict rule
SPEED_TOLERANCE = 0.15  # px/frame, the speed rule


# ---------------------------------------------------------------------------- rendering
def reflect(p):
    """Positions on the unbounded line -> inside [LO, HI], mirrored at each bound (an elastic bounce).
    Works on floats and arrays: p - LO is folded with period 2·(HI - LO)."""
    span = HI - LO
    return LO + span - abs((p - LO) % (2 * span) - span)


def centres(spec):
    """A clip spec -> the object's nominal centre in each frame, float64 array (T, 2) as (x, y)."""
    t = np.arange(spec["frames"], dtype=np.float64)
    step = DIRECTIONS[spec["direction"]]
    axis = 0 if step[0] else 1  # the one coordinate that moves
    path = np.tile(np.array(spec["start"], dtype=np.float64), (len(t), 1))  # (T, 2)
    path[:, axis] = reflect(spec["start"][axis] + step[axis] * spec["v"] * t)
    return path


def shape_mask(shape, cx, cy):
    """(..., 32, 32) bool array: pixels whose centre (x+0.5, y+0.5) lies inside `shape` centred at cx, cy,
    float arrays (...)."""
    grid = np.arange(SIZE) + 0.5
    dx = grid - np.asarray(cx, dtype=np.float64)[..., None, None]  # (..., 1, W)
    dy = grid[:, None] - np.asarray(cy, dtype=np.float64)[..., None, None]  # (..., H, 1)
    r = OBJECT_SIZE / 2
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def draw_clips(n, generator=None, frames=FRAMES, speeds=V_RANGE, combos=None):
    """n clip specs {color, shape, direction, v, start: [x0, y0], frames}, seen combinations unless
    `combos` says otherwise. Deterministic for the torch.Generator; the world is endless."""
    combos = SPLITS["seen"] if combos is None else combos
    if not (0 < speeds[0] <= speeds[1] and LEAD_FRAMES * speeds[1] <= HI - LO) or frames < 1:
        raise ValueError(f"speeds must satisfy 0 < low <= high <= {(HI - LO) / LEAD_FRAMES} and frames >= 1, "
                         f"got {speeds}, {frames}")
    pick = torch.randint(len(combos), (n,), generator=generator).tolist()
    uniform = torch.rand(n, 3, generator=generator, dtype=torch.float64)  # speed, along-axis start, off-axis start
    v = speeds[0] + (speeds[1] - speeds[0]) * uniform[:, 0]
    behind = LO + uniform[:, 1] * (HI - LO - LEAD_FRAMES * v)  # counted from the wall behind: >= 4·v to the one ahead
    off_axis = LO + uniform[:, 2] * (HI - LO)
    specs = []
    for i, k in enumerate(pick):
        color, shape, direction = combos[k]
        dx, dy = DIRECTIONS[direction]
        along = behind[i].item() if dx + dy > 0 else LO + HI - behind[i].item()  # mirrored when moving to LO
        start = [along, off_axis[i].item()] if dx else [off_axis[i].item(), along]
        specs.append(dict(color=color, shape=shape, direction=direction, v=v[i].item(), start=start, frames=frames))
    return specs


def render(specs):
    """Clip specs of one length -> uint8 video (N, T, 32, 32, 3): flat colour on black, no anti-aliasing."""
    frames = specs[0]["frames"]
    if any(spec["frames"] != frames for spec in specs):
        raise ValueError(f"render takes clips of one length, got {sorted({spec['frames'] for spec in specs})}")
    video = np.zeros((len(specs), frames, SIZE, SIZE, 3), dtype=np.uint8)
    for clip, spec in zip(video, specs):
        path = centres(spec)  # (T, 2)
        clip[shape_mask(spec["shape"], path[:, 0], path[:, 1])] = COLORS[spec["color"]]
    return torch.from_numpy(video)


def captions(specs, generator=None, template=None):
    """A random template per clip, or template k for all (evaluation: 0)."""
    if template is None:
        pick = torch.randint(len(TEMPLATES), (len(specs),), generator=generator).tolist()
    else:
        pick = [template] * len(specs)
    return [TEMPLATES[k].format(**spec) for k, spec in zip(pick, specs)]


# ---------------------------------------------------------------------------- judging
PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (6, 3)
CENTROID_BELOW = {"circle": 0.0, "square": 0.0, "triangle": OBJECT_SIZE / 6}  # centroid - nominal centre, y: r/3
DARKEST_PEAK = 64  # a frame peaking darker holds no object (every palette colour peaks at 200 or more)


def judge_frames(video):
    """uint8 (T, H, W, 3) -> per frame (colour, shape, cx, cy) with the NOMINAL centre, or None where
    no object is drawn."""
    frames = video.astype(np.float64)
    bright = frames.max(-1)  # (T, H, W): brightest channel
    peak = bright.max((1, 2))  # (T,)
    mask = bright > peak[:, None, None] / 2  # the object: over half the frame's peak brightness
    n = mask.sum((1, 2)).clip(1)
    grid = np.arange(SIZE) + 0.5
    cx = (mask * grid).sum((1, 2)) / n  # (T,) centroids
    cy = (mask * grid[:, None]).sum((1, 2)) / n
    ious = []  # each template placed with ITS centroid on the object's centroid: (3, T)
    for shape in SHAPES:
        template = shape_mask(shape, cx, cy - CENTROID_BELOW[shape])  # (T, H, W)
        ious.append((mask & template).sum((1, 2)) / (mask | template).sum((1, 2)).clip(1))
    best_shape = np.argmax(ious, 0)  # (T,)
    out = []
    for i, frame in enumerate(frames):
        if peak[i] < DARKEST_PEAK:
            out.append(None)
            continue
        brightness = bright[i][mask[i]]
        top = frame[mask[i]][brightness >= np.median(brightness)]  # its brightest pixels
        color = list(COLORS)[int(np.argmin(((PALETTE - np.median(top, 0)) ** 2).sum(-1)))]
        shape = SHAPES[best_shape[i]]
        out.append((color, shape, cx[i], cy[i] - CENTROID_BELOW[shape]))
    return out


def _path_errors(t, along, speeds, starts):
    """Mean |along - reflect(LO + start + v·t)| for every (speed, start) pair: (len(speeds), len(starts)).
    start is the unfolded offset from LO: the path starts at LO + start moving to HI when start >= 0, and
    at LO - start moving to LO when start < 0 (reflect is mirror-symmetric about LO). reflect() is
    written out here in float32 and in place, as a fraction of its period (tests: the two agree)."""
    period = 2 * (HI - LO)
    starts, speeds, t = starts.astype(np.float32), speeds.astype(np.float32), t.astype(np.float32)
    cycles = starts[None, :, None] + speeds[:, None, None] * t  # (V, P, T): the unfolded offset from LO
    cycles *= np.float32(1 / period)  # ... in periods
    cycles -= np.floor(cycles)  # u / period, u = offset mod period
    cycles *= np.float32(period)
    cycles -= np.float32(HI - LO)
    path = np.abs(cycles, out=cycles)
    path -= np.float32(HI)  # path - HI = -(reflect(...)): the error's sign does not matter
    path += along.astype(np.float32)
    return np.abs(path, out=path).mean(-1)


def _allowed(speeds, starts, toward_hi):
    """(V, P) bool: p0 in the bounds with at least one frame of travel in the direction before the first
    bounce (a path that bounces at once first moves the other way: that direction describes it)."""
    span = HI - LO
    behind = starts if toward_hi else span + starts  # p0's distance from the wall behind it, px
    return (behind[None, :] >= 0) & (span - behind[None, :] >= speeds[:, None])


COARSE_SPEEDS = np.arange(0, 3.0001, 0.05)  # px/frame; the fit looks no faster than 3
COARSE_STARTS = np.arange(-(HI - LO), HI - LO + 0.0001, 0.5)  # unfolded starts, px
FINE_SPEEDS = np.arange(-0.06, 0.0601, 0.005)  # around a coarse point
FINE_STARTS = np.arange(-0.6, 0.601, 0.05)


def fit_motion(t, track):
    """The motion law fitted to a track of nominal centres: t (T,) frame indices, track (T, 2) as (x, y).
    -> {direction: (speed, p0, error px)} for the four directions, each from its best bouncing path: a
    coarse grid (0.05 px/frame x 0.5 px), then a fine one (0.005 x 0.05) around its three best points."""
    out = {}
    for axis in (0, 1):
        along, off = track[:, axis], track[:, 1 - axis]
        off_error = np.abs(off - np.median(off)).mean()
        coarse = _path_errors(t, along, COARSE_SPEEDS, COARSE_STARTS)  # (V, P), both directions on this axis
        for direction, step in DIRECTIONS.items():
            if step[axis] == 0:
                continue
            toward_hi = step[axis] > 0
            errors = np.where(_allowed(COARSE_SPEEDS, COARSE_STARTS, toward_hi), coarse, np.inf)
            best = (np.inf, 0.0, 0.0)
            for flat in np.argsort(errors, axis=None)[:3]:
                i, j = np.unravel_index(flat, errors.shape)
                speeds = np.clip(COARSE_SPEEDS[i] + FINE_SPEEDS, 0, None)
                starts = COARSE_STARTS[j] + FINE_STARTS
                fine = np.where(_allowed(speeds, starts, toward_hi), _path_errors(t, along, speeds, starts), np.inf)
                a, b = np.unravel_index(np.argmin(fine), fine.shape)
                if fine[a, b] < best[0]:
                    best = (fine[a, b], speeds[a], starts[b])
            error, speed, start = best
            out[direction] = (float(speed), float(LO + abs(start)), float(error + off_error))
    return out


def judge_clip(video):
    """uint8 (T, H, W, 3) -> what the clip shows, prompt-independent: majority colour and shape (a tie
    goes to the earliest frame's), the fitted direction ("none" under 3 px of travel), speed, start and
    residual, the largest jump between consecutive found frames, and the per-frame judgements."""
    frames = judge_frames(video)
    t = np.array([i for i, f in enumerate(frames) if f is not None], dtype=np.float64)
    found = [f for f in frames if f is not None]
    if len(found) < 2:
        return dict(color=None, shape=None, direction=None, speed=0.0, start=None, residual=np.inf, jump=np.inf,
                    frames=frames)
    colors = [f[0] for f in found]
    shapes = [f[1] for f in found]
    track = np.array([f[2:] for f in found])  # (T_found, 2)
    fits = fit_motion(t, track)
    direction = min(fits, key=lambda d: fits[d][2])  # a tie goes to the first in DIRECTIONS
    speed, start, residual = fits[direction]
    if speed * (len(frames) - 1) < MIN_TRAVEL:
        direction = "none"
    jump = np.sqrt((np.diff(track, axis=0) ** 2).sum(-1)).max()
    return dict(color=max(colors, key=colors.count), shape=max(shapes, key=shapes.count), direction=direction,
                speed=speed, start=start, residual=residual, jump=float(jump), frames=frames)


BREAKS = ("wrong colour", "wrong shape", "wrong direction", "object lost", "colour changes", "shape changes",
          "off the path", "jump")  # the strict rule's checks, as verdict names them


def verdict(judged, spec):
    """A judged clip against its prompt spec {color, shape, direction, v = the motion_score asked}
    -> {right, strict, speed: bools; breaks: the strict rule's checks that fail, by name}."""
    right = all(judged[k] == spec[k] for k in ("color", "shape", "direction"))
    frames = judged["frames"]
    failed = (judged["color"] != spec["color"], judged["shape"] != spec["shape"], judged["direction"] != spec["direction"],
              any(f is None for f in frames), any(f is not None and f[0] != spec["color"] for f in frames),
              any(f is not None and f[1] != spec["shape"] for f in frames), judged["residual"] > MAX_RESIDUAL,
              judged["jump"] > MAX_JUMP)
    breaks = [name for name, fails in zip(BREAKS, failed) if fails]
    return dict(right=right, strict=not breaks, speed=abs(judged["speed"] - spec["v"]) <= SPEED_TOLERANCE,
                breaks=breaks)


def score(video, specs):
    """uint8 videos (N, T, H, W, 3) against their prompt specs -> the share of clips that are right, strict
    and at speed, how many fail each strict check, and the mean fitted speed per motion_score asked."""
    judged = [judge_clip(clip) for clip in np.asarray(video)]
    verdicts = [verdict(j, spec) for j, spec in zip(judged, specs)]
    out = {rule: float(np.mean([v[rule] for v in verdicts])) for rule in ("right", "strict", "speed")}
    out["breaks"] = {name: sum(name in v["breaks"] for v in verdicts) for name in BREAKS}
    asked = sorted({spec["v"] for spec in specs})
    out["fitted_speed"] = {str(v): float(np.mean([j["speed"] for j, s in zip(judged, specs) if s["v"] == v])) for v in asked}
    return out
