"""world.py: the renderer keeps the contract (colours, shapes, bounces, starts, splits), the judge reads
every ground-truth clip right and strict with its speed, and it catches the ways generated clips break."""
import numpy as np
import pytest
import torch

import world
from world import COLORS, COMBOS, DIRECTIONS, HELD_OUT, HI, LO, SHAPES, SPLITS, V_RANGE


def test_reflect_bounces_elastically_and_the_judge_fast_path_agrees():
    assert world.reflect(27.5) == 25.5 and world.reflect(4.5) == 6.5  # 1 px past a bound comes back 1 px
    assert world.reflect(LO + 42) == LO and world.reflect(HI + 21) == LO  # period 42 px; across the whole span
    p = np.linspace(-100, 100, 2001)
    assert ((world.reflect(p) >= LO) & (world.reflect(p) <= HI)).all()
    t, along = np.arange(41.0), np.random.default_rng(0).uniform(LO, HI, 41)
    speeds, starts = np.arange(0, 3, 0.05), np.arange(-21, 21, 0.5)
    by_hand = np.abs(world.reflect(LO + starts[None, :, None] + speeds[:, None, None] * t) - along).mean(-1)
    np.testing.assert_allclose(world._path_errors(t, along, speeds, starts), by_hand, atol=1e-4)


def test_world_matches_the_contract():
    assert len(COMBOS) == 72 and len(SPLITS["held-out"]) == 12 and len(SPLITS["seen"]) == 60
    assert COLORS["red"] == (220, 40, 40) and COLORS["cyan"] == (50, 210, 210) and len(COLORS) == 6
    masks = {s: world.shape_mask(s, 16.0, 16.0) for s in SHAPES}
    assert masks["square"].sum() == 100 and masks["square"].sum() > masks["circle"].sum() > masks["triangle"].sum()
    assert masks["triangle"][11].sum() < masks["triangle"][20].sum()  # apex up: narrow at the top
    specs = world.draw_clips(600, torch.Generator().manual_seed(0), frames=41)
    assert not {(s["color"], s["shape"]) for s in specs} & HELD_OUT  # held-out pairs are never drawn for training
    assert {(s["color"], s["shape"], s["direction"]) for s in specs} == set(SPLITS["seen"])
    video = world.render(specs[:60]).numpy()
    assert video.shape == (60, 41, 32, 32, 3)
    bounced = 0
    for s, clip in zip(specs, video):
        assert V_RANGE[0] <= s["v"] <= V_RANGE[1]
        path = world.centres(s)  # (T, 2)
        assert ((LO <= path) & (path <= HI)).all()
        sign = np.array(DIRECTIONS[s["direction"]])
        axis = int(sign[1] != 0)
        unfolded = s["start"][axis] + sign[axis] * s["v"] * np.arange(41)
        np.testing.assert_allclose(path[:, axis], world.reflect(unfolded))  # the law, bounces and all
        assert (path[:, 1 - axis] == s["start"][1 - axis]).all()  # the other coordinate stays fixed
        step = np.diff(path, axis=0) @ sign  # travel in the prompted direction
        np.testing.assert_allclose(step[:4], s["v"])  # 4 frames of travel before the first bounce
        bounced += (step < 0).any()  # a wall turns the object around
        drawn = clip.max(-1) > 0  # (T, H, W)
        assert (clip[drawn] == COLORS[s["color"]]).all()  # one flat colour on pure black, no anti-aliasing
        assert (drawn == world.shape_mask(s["shape"], path[:, 0], path[:, 1])).all()
    assert bounced > 30  # most 41-frame clips meet a wall
    for s in specs:  # the first 4 frames' travel fits before the wall ahead
        dx, dy = DIRECTIONS[s["direction"]]
        p0 = s["start"][0 if dx else 1]
        assert (HI - p0 if dx + dy > 0 else p0 - LO) >= 4 * s["v"] - 1e-9
    assert world.captions(specs[:1], template=0) == [f"a {specs[0]['color']} {specs[0]['shape']} moving {specs[0]['direction']}"]


@pytest.mark.parametrize("frames", [17, 41])
def test_the_judge_reads_every_ground_truth_clip_right_strict_and_at_its_speed(frames):
    generator = torch.Generator().manual_seed(frames)
    for v in (0.5, 0.9, 1.25):
        specs = [world.draw_clips(1, generator, frames, (v, v), [combo])[0] for combo in COMBOS]  # every combination
        for s, clip in zip(specs, world.render(specs).numpy()):
            judged = world.judge_clip(clip)
            assert world.verdict(judged, s) == dict(right=True, strict=True, speed=True, breaks=[]), (s, judged)
            axis = 0 if DIRECTIONS[s["direction"]][0] else 1
            assert abs(judged["speed"] - v) < 0.05 and abs(judged["start"] - s["start"][axis]) < 0.6


def test_the_judge_catches_stalled_jumping_shape_flipping_and_wrong_speed_clips():
    s = dict(color="blue", shape="circle", direction="up", v=0.9, start=[15.0, 20.0], frames=41)  # bounces at frame ~16
    clip = world.render([s]).numpy()[0]
    assert world.verdict(world.judge_clip(clip), s)["strict"]

    def breaks(video, spec=s):
        return world.verdict(world.judge_clip(video), spec)["breaks"]
    stalled = clip.copy()
    stalled[20:] = clip[20]  # stops after the bounce
    assert breaks(stalled) == ["off the path"]
    summed = world.score(np.stack([clip, stalled]), [s, s])  # a set of clips: shares, counts, mean fitted speed
    assert (summed["right"], summed["strict"], summed["breaks"]["off the path"], summed["breaks"]["jump"]) == (1.0, 0.5, 1, 0)
    assert list(summed["fitted_speed"]) == ["0.9"]
    slid = clip.copy()  # meets the wall, then slides along it instead of bouncing (what streamed clips did)
    slid[16:] = world.render([dict(s, direction="right", start=[15.0, LO])]).numpy()[0][:25]
    assert "off the path" in breaks(slid)
    jumped = clip.copy()
    jumped[25:] = world.render([dict(s, start=[20.0, 20.0])]).numpy()[0][25:]  # 5 px sideways at a window join
    assert "jump" in breaks(jumped)
    flipped = clip.copy()
    flipped[30] = world.render([dict(s, shape="square")]).numpy()[0][30]  # one frame of another shape
    assert breaks(flipped) == ["shape changes"] and world.verdict(world.judge_clip(flipped), s)["right"]
    lost = clip.copy()
    lost[3] = 0
    assert breaks(lost) == ["object lost"]
    slow = world.judge_clip(world.render([dict(s, v=0.5)]).numpy()[0])
    assert world.verdict(slow, s) == dict(right=True, strict=True, speed=False, breaks=[])  # 0.5 asked 0.9
    assert abs(slow["speed"] - 0.5) < 0.05
    still = world.render([dict(s, v=0.05)]).numpy()[0]  # 2 px of travel over the clip: not moving
    assert world.judge_clip(still)["direction"] == "none" and "wrong direction" in breaks(still)
    assert breaks(clip, dict(s, direction="down")) == ["wrong direction"]  # the first frames decide, not the bounce
    # a majority tie (8 frames each, 1 of a third) goes to the earlier frames' shape, in either order
    square, circle, triangle = (world.render([dict(s, shape=x, frames=17)]).numpy()[0] for x in ("square", "circle", "triangle"))
    for first, second, name in ((square, circle, "square"), (circle, square, "circle")):
        assert world.judge_clip(np.concatenate([first[:8], second[8:16], triangle[16:]]))["shape"] == name
