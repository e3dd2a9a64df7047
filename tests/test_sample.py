"""sample.py end to end at tiny size, from freshly initialised checkpoints written as train_tiny.py
writes them: one clip, a batch with its manifest, a streamed long clip, seeds, every bad input's
one-line message, and the full-size dry run's parameter table."""
import dataclasses
import json
import re
import shutil
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import diffusion
import lm
import sample
import tokenizer
import vae

CAPTIONS = ["a red circle moving left", "a blue square moves up", "green triangle going down"]
FAST = ["--steps", "2"]  # two Euler steps: every stage still runs, in a fraction of the time


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint folder of freshly initialised tiny stages, in train_tiny.py's format. The DiT and
    ControlNet weights are perturbed: their zero-inits would otherwise make the LM's tokens irrelevant."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    c = diffusion.PRESETS["tiny"]
    mods = {"vae": vae.VAE(vae.PRESETS["tiny"]), "tokenizer": tokenizer.SemanticTokenizer(tokenizer.PRESETS["tiny"]),
            "lm": lm.SemanticLM(lm.PRESETS["tiny"]), "dit": diffusion.DiT(c), "control": diffusion.ControlNet(c)}
    with torch.no_grad():
        for p in [*mods["dit"].parameters(), *mods["control"].parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    text = lm.TextEncoder(lm.PRESETS["tiny"], lm.TextEncoder.build_vocab(CAPTIONS))
    for s, m in mods.items():
        extra = {"text": text.state_dict()} if s == "lm" else {}
        sample.save_checkpoint(str(d / f"{s}.pt"), stage=s, config=dataclasses.asdict(m.cfg), model=m.state_dict(),
                               done=True, **extra)
    return d


def frames_of(path):
    return np.stack(imageio.mimread(str(path)))[..., :3]  # (T, H, W, 3)


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_one_clip_has_the_models_shape_and_each_stage_reports(ckpt, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    sample.main(["--ckpt", str(ckpt), "--out", str(out), "--prompt", "a red circle moving left", *FAST])
    t = tokenizer.PRESETS["tiny"]
    assert frames_of(out).shape == (17, t.image_h, t.image_w, 3)
    log = capsys.readouterr().out
    for stage, shape in (("lm", (1, t.n_tokens)), ("tokenizer", (1, t.frames, t.feat_dim, t.feat_h, t.feat_w)),
                         ("vae", (1, 3, 17, t.image_h, t.image_w))):
        assert re.search(rf"{stage}: {re.escape(str(shape))} in \d", log), log


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_batch_writes_one_clip_per_line_and_a_manifest(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\na blue square moves up\n")  # blank lines are skipped
    out = tmp_path / "clips"
    sample.main(["--ckpt", str(ckpt), "--prompts-file", str(prompts), "--out-dir", str(out), "--seed", "5",
                 "--motion-score", "0.75", *FAST])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["prompt"] for m in manifest] == ["a red circle moving left", "a blue square moves up"]
    assert [m["seed"] for m in manifest] == [5, 6] and {m["frames"] for m in manifest} == {17}
    assert {m["motion_score"] for m in manifest} == {0.75}
    assert [m["path"] for m in manifest] == [str(out / "0000.gif"), str(out / "0001.gif")]
    # clip i is the clip a single run with seed + i makes
    single = tmp_path / "single.gif"
    sample.main(["--ckpt", str(ckpt), "--prompt", "a blue square moves up", "--seed", "6", "--motion-score", "0.75",
                 "--out", str(single), *FAST])
    assert np.array_equal(frames_of(out / "0001.gif"), frames_of(single))


@pytest.mark.exercise("streaming", points=3)
@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d")
def test_long_clip_streams_window_by_window(ckpt, tmp_path, capsys):
    out = tmp_path / "long.mp4"  # also the mp4 path (imageio-ffmpeg)
    sample.main(["--ckpt", str(ckpt), "--frames", "41", "--out", str(out), *FAST])
    t = tokenizer.PRESETS["tiny"]
    if out.exists():
        assert frames_of(out).shape == (41, t.image_h, t.image_w, 3)
    else:  # no ffmpeg on this machine: the GIF fallback
        assert frames_of(out.with_suffix(".gif")).shape[0] == 41
    log = capsys.readouterr().out
    c, tf = diffusion.PRESETS["tiny"], vae.PRESETS["tiny"].temporal_factor
    windows = 1 + (41 - (1 + (c.frames - 1) * tf)) // ((c.frames - c.prefix) * tf)  # 17 + 3 * 8: four windows
    overlap = t.n_i + (c.prefix - 1) * t.n_p  # codes of the semantic frames a window's clean prefix fixes
    # window 0: a whole segment; then only the new frames' codes, the overlap re-encoded from the frames so far
    assert re.findall(r" lm: \(1, (\d+)\)", log) == [str(t.n_tokens)] + [str(t.n_tokens - overlap)] * (windows - 1)
    assert log.count("features: (1, 3,") == windows - 1
    p = sample.load_pipeline(str(ckpt))
    p.features = None  # no feature source (the released weights, without Theia): the LM writes each whole segment
    sample.generate_video(p, CAPTIONS[:1], frames=41, steps=1, log=print)
    assert re.findall(r" lm: \(1, (\d+)\)", capsys.readouterr().out) == [str(t.n_tokens)] * windows
    assert "vae: (1, 3, 41," in log


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_same_seed_same_clip_and_the_offload_path_agrees(ckpt):
    p = sample.load_pipeline(str(ckpt))
    kw = dict(frames=17, steps=2, top_k=50)
    a, b = sample.generate_video(p, CAPTIONS[:1], seed=3, **kw), sample.generate_video(p, CAPTIONS[:1], seed=3, **kw)
    assert a.shape == (1, 17, 32, 32, 3) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, sample.generate_video(p, CAPTIONS[:1], seed=4, **kw))
    p.device, p.offload = torch.device("cpu"), True  # the full-size path: stages visit the device one at a time
    assert torch.equal(a, sample.generate_video(p, CAPTIONS[:1], seed=3, **kw))
    assert sample.generate_video(p, CAPTIONS[:1], seed=3, baseline=True, **kw).shape == a.shape


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_diffusion_noise_does_not_depend_on_the_lms_draws(ckpt, monkeypatch):
    """The LM has its own generator: greedy decoding draws no random numbers, sampling draws many, the
    baseline runs no LM at all, and the DiT sees the same noise for the same seed in all three."""
    noise = []
    euler_sample = sample.diffusion.euler_sample

    def spy(dit, x, *args, **kwargs):
        noise.append(x.clone())
        return euler_sample(dit, x, *args, **kwargs)
    monkeypatch.setattr(sample.diffusion, "euler_sample", spy)
    p = sample.load_pipeline(str(ckpt))
    for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(baseline=True)):
        sample.generate_video(p, CAPTIONS[:1], seed=3, frames=25, steps=1, **kw)
    assert len(noise) == 6  # two windows per clip
    assert all(torch.equal(a, b) for a, b in zip(noise[:2], noise[2:4])) and torch.equal(noise[:2][0], noise[4])
    assert torch.equal(noise[1], noise[5]) and not torch.equal(noise[0], noise[1])


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_baseline_samples_the_base_dit_alone(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moves up\n")
    out = tmp_path / "base"
    sample.main(["--ckpt", str(ckpt), "--prompts-file", str(prompts), "--out-dir", str(out), "--baseline", *FAST])
    log = capsys.readouterr().out
    assert "base DiT alone" in log and "dit: (1," in log and "lm:" not in log and "tokenizer:" not in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["baseline"] for m in manifest] == [True, True] and frames_of(out / "0001.gif").shape[0] == 17
    single = tmp_path / "single.gif"  # --prompt/--out too, and it is not the LanDiff clip
    sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle moving left", "--out", str(single), "--baseline", *FAST])
    assert np.array_equal(frames_of(single), frames_of(out / "0000.gif"))
    landiff = tmp_path / "landiff.gif"
    sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle moving left", "--out", str(landiff), *FAST])
    assert not np.array_equal(frames_of(single), frames_of(landiff))


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_mp4_falls_back_to_gif_without_ffmpeg(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails, as when it is not installed
    sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x.mp4"), "--steps", "1"])
    assert (tmp_path / "x.gif").exists() and not (tmp_path / "x.mp4").exists()
    assert "writing" in capsys.readouterr().out


def error_of(argv, capsys):
    """main(argv) must stop with a one-line message and no traceback; -> that message."""
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg and msg.lower().startswith(("error", "sample.py: error", "usage")), msg
    return msg


def test_bad_inputs_each_name_what_is_allowed(ckpt, tmp_path, capsys):
    run = lambda *a: error_of(["--ckpt", str(ckpt), "--out", str(tmp_path / "o.gif"), *FAST, *a], capsys)  # noqa: E731
    msg = run("--preset", "huge")  # argparse's own one-line error
    assert "invalid choice" in msg and "tiny" in msg and "full" in msg
    assert "python train_tiny.py" in run("--ckpt", str(tmp_path / "nowhere"))  # the later --ckpt wins
    assert "frames must be 17 + 8k (17, 25, ..., 121), got 20" in run("--frames", "20")
    assert "frames must be 17 + 8k (17, 25, ..., 121), got 0" in run("--frames", "0")  # 0 is not "not given"
    assert "--steps must be >= 1" in run("--steps", "0")
    assert "frames must be 49 + 24k (49, 73, ..., 505), got 0" in error_of(["--preset", "full", "--dry-run", "--frames", "0"], capsys)
    msg = run("--prompt", "a purple hexagon moving sideways")
    assert "never saw hexagon, purple, sideways" in msg and "the words it knows: a blue circle" in msg, msg
    (tmp_path / "mixed.txt").write_text("a red circle moving left\na purple circle\n")  # the whole list, before any work
    msg = error_of(["--ckpt", str(ckpt), "--prompts-file", str(tmp_path / "mixed.txt"), "--out-dir", str(tmp_path / "m")],
                   capsys)
    assert "never saw purple" in msg and "lm:" not in capsys.readouterr().out and not (tmp_path / "m" / "0000.gif").exists()
    assert "--motion-score must lie in [0, 2.0]" in run("--motion-score", "5")
    assert "needs a GPU" in run("--preset", "full", "--device", "cpu")
    assert "--out must end in .gif or .mp4" in error_of(["--ckpt", str(ckpt), "--out", "x.png"], capsys)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "is empty" in error_of(["--prompts-file", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path)], capsys)
    (tmp_path / "a_file").write_text("")  # a folder that cannot be made: its parent is a file
    msg = error_of(["--ckpt", str(ckpt), "--out", str(tmp_path / "a_file" / "sub" / "x.gif")], capsys)
    assert "cannot write into" in msg and "lm:" not in capsys.readouterr().out  # checked before any work


def bad_folder(ckpt, tmp_path, name, **change):
    """A copy of the checkpoint folder whose `name`.pt is replaced by change(ck) or by garbage bytes."""
    d = tmp_path / f"bad_{name}"
    shutil.copytree(ckpt, d)
    if not change:
        (d / f"{name}.pt").write_bytes(b"not a checkpoint")
    else:
        ck = torch.load(d / f"{name}.pt", weights_only=True)
        sample.save_checkpoint(str(d / f"{name}.pt"), **change["fn"](ck))
    return d


def test_corrupt_and_foreign_checkpoints(ckpt, tmp_path, capsys):
    d = bad_folder(ckpt, tmp_path, "lm")
    assert "lm.pt is not a readable checkpoint" in error_of(["--ckpt", str(d), "--out", str(tmp_path / "o.gif")], capsys)
    full = dataclasses.asdict(tokenizer.PRESETS["full"])  # only the config is read before the error
    d = bad_folder(ckpt, tmp_path, "tokenizer", fn=lambda ck: {**ck, "config": full})
    msg = error_of(["--ckpt", str(d), "--out", str(tmp_path / "o.gif")], capsys)
    assert "full-preset checkpoints" in msg and "--preset full" in msg
    def without_digits(ck):  # an LM written before it read the FSQ digits
        return {**ck, "model": {k: v for k, v in ck["model"].items() if not k.startswith("digits_")}}
    d = bad_folder(ckpt, tmp_path / "old", "lm", fn=without_digits)
    msg = error_of(["--ckpt", str(d), "--out", str(tmp_path / "o.gif")], capsys)
    assert "lm.pt does not fit this version's lm" in msg and "digits_in.weight" in msg and "train_tiny.py" in msg


@pytest.mark.parametrize("stage", ["text", "lm", "tokenizer", "dit", "vae"])
@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_nan_in_a_stage_stops_there_and_names_it(ckpt, tmp_path, capsys, stage):
    def poison(ck):  # every weight of that stage NaN: its output goes bad, nothing before it does
        key = "text" if stage == "text" else "model"
        nan = lambda v: torch.full_like(v, float("nan")) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return {**ck, key: {k: nan(v) for k, v in ck[key].items()}}
    d = bad_folder(ckpt, tmp_path, "lm" if stage == "text" else stage, fn=poison)
    msg = error_of(["--ckpt", str(d), "--out", str(tmp_path / "o.gif"), "--steps", "1"], capsys)
    assert f"NaN/inf in the {stage} stage" in msg and "fp32" in msg


@pytest.mark.uses("causal_conv", "controlnet", "expert_adaln", "kv_cache", "lm_sequence", "masks", "rope", "rope_3d")
def test_full_dry_run_counts_every_stage_on_meta(capsys):
    with torch.device("meta"):
        expect = {"LM": lm.SemanticLM(lm.PRESETS["full"]), "tokenizer": tokenizer.SemanticTokenizer(tokenizer.PRESETS["full"]),
                  "DiT": diffusion.DiT(diffusion.PRESETS["full"]), "ControlNet + upsampler": diffusion.ControlNet(diffusion.PRESETS["full"]),
                  "VAE": vae.VAE(vae.PRESETS["full"])}
    expect = {k: sum(p.numel() for p in m.parameters()) for k, m in expect.items()}
    expect["total"] = sum(expect.values())
    sample.main(["--preset", "full", "--dry-run"])
    out = capsys.readouterr().out
    got = {k: int(re.search(rf"^{re.escape(k)} +([\d,]+) ", out, re.M).group(1).replace(",", "")) for k in expect}
    assert got == expect
    assert re.search(r"^text encoder +none ", out, re.M) and 5.0e9 < expect["total"] < 5.2e9  # docs/DESIGN.md §6: ≈ 5.1 B
    t, c = tokenizer.PRESETS["full"], diffusion.PRESETS["full"]
    for shape in [(1, t.n_tokens), (1, t.frames, t.feat_dim, t.feat_h, t.feat_w),
                  (2, c.latent_ch, c.frames, c.lat_h, c.lat_w), (1, 3, 49, t.image_h, t.image_w)]:
        assert str(shape) in out, shape
    assert "stage offload" in out and "no offload" in out


def test_a_checkpoint_from_before_the_gelu_setting_keeps_the_tanh_form(ckpt, tmp_path):
    """Checkpoints written before the MLPs' GELU form was a setting ran the release's tanh form: they must load
    with it, not with the tiny preset's exact GELU; new checkpoints keep the form they were trained with."""
    for s in sample.STAGES:
        ck = torch.load(ckpt / f"{s}.pt", weights_only=True)
        ck["config"].pop("gelu", None)
        torch.save(ck, tmp_path / f"{s}.pt")
    old, new = sample.load_pipeline(str(tmp_path)), sample.load_pipeline(str(ckpt))
    assert (old.lm.cfg.gelu, old.dit.cfg.gelu, old.control.cfg.gelu) == ("tanh",) * 3
    assert (new.lm.cfg.gelu, new.dit.cfg.gelu, new.control.cfg.gelu) == ("none",) * 3
