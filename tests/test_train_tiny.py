"""train_tiny.py: every stage runs end to end for a few steps and the evaluation reports both models
side by side, checkpoints load as weights-only files, the data built in two processes lines up clip by
clip, and a resumed stage finishes exactly where an uninterrupted one does. (The world: test_world.py.)"""
import argparse
import json
import os
import threading
from concurrent.futures import Future

import pytest
import torch

import sample
import train_tiny
import vae


@pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "flow_matching", "fsq", "kv_cache", "lm_sampling", "lm_sequence", "masks", "rope", "rope_3d", "streaming")
def test_smoke_run_every_stage_then_evaluate(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    report = train_tiny.main(["--out", out, "--steps", "2", "--eval-clips", "1", "--euler-steps", "1"])
    assert set(report) == set(train_tiny.PLAN) | {"eval"}
    summary = report["eval"]["summary"]
    assert list(summary) == ["accuracy seen", "accuracy held-out", "strict seen", "strict held-out", "speed-following",
                             "long clips passing"]
    assert all(list(row) == ["LanDiff", "base DiT"] and all(0 <= x <= 1 for x in row.values()) for row in summary.values())
    assert set(report["eval"]["LanDiff"]["speed"]["fitted_speed"]) == {"0.5", "1.25"}
    for name in train_tiny.PLAN:  # weights-only loadable, done, with the config to rebuild from
        ck = torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)
        assert ck["stage"] == name and ck["done"] and ck["step"] == 2
    assert os.path.exists(os.path.join(out, "samples.png"))
    assert json.load(open(os.path.join(out, "report.json")))["total_seconds"] > 0
    p = sample.load_pipeline(out)  # the round trip: sample.py reads what train_tiny.py wrote
    assert p.vae.cfg.scale_factor != vae.PRESETS["tiny"].scale_factor  # the measured latent scale was kept
    # the DiT reads its own text encoder (the paper's DiT: its own T5), kept in dit.pt and frozen: not in its optimizer
    assert p.text_dit.words == p.text.words and not torch.equal(p.text_dit.embed.weight, p.text.embed.weight)
    optimized = torch.load(os.path.join(out, "dit.pt"), weights_only=True)["optim"]["param_groups"][0]["params"]
    assert len(optimized) == len(list(p.dit.parameters()))
    log = capsys.readouterr().out
    assert "accuracy held-out" in log and "LanDiff" in log and "base DiT" in log and "long clips passing" in log
    # the diffusion stages' data, built across two processes in the full run, belongs clip by clip to
    # the LM's clips: latents from the VAE + DiT process (here resumed: loaded, not retrained), ids and
    # reconstructions from this one
    args = argparse.Namespace(out=out, seed=0, steps=2, resume=True)
    _, lat = train_tiny.vae_dit_process(args, 1, threading.Event())
    ctx = vars(sample.load_pipeline(out, stages=("vae", "tokenizer")))
    with torch.no_grad():  # 2 steps leave every code at the centre of the grid: spread them, or nothing is checked
        ctx["tok"].encoder.to_code.weight.mul_(300)
    data = train_tiny.pools(args, ctx, "train", lat)
    others = torch.cat([data[17]["ids"][:3], data[17]["ids"][4:]])
    assert (others != data[17]["ids"][3]).any(1).all()  # clip 3, checked below, has tokens of its own
    for f in train_tiny.POOL:
        x = train_tiny.clips(data[f]["specs"][3:4])  # one clip, on its own
        # 1e-4: the pool encoded in a batch and one clip alone take different convolution kernels (other summation
        # orders, ~1e-5 apart in fp32); another clip's latents would differ by O(1)
        torch.testing.assert_close(lat[f][3:4], ctx["vae"].encode(x)[0] * ctx["vae"].cfg.scale_factor, atol=1e-4, rtol=1e-4)
        ids = train_tiny.encode(ctx, data[f]["specs"][3:4], "ids")
        assert ids.shape[1] == (1 + (f - 17) // 8) * ctx["tok"].cfg.n_tokens  # one segment per diffusion window
        assert (data[f]["ids"][3:4] == ids).float().mean() > 0.9  # (a rounding at an FSQ level boundary may flip one)
        torch.testing.assert_close(data[f]["rec"][3], ctx["tok"].decode(data[f]["ids"][3].view(-1, ctx["tok"].cfg.n_tokens)))
    x0, _, sem, prefix = train_tiny.window_batch(dict(ctx, text_dit=p.text_dit), data, 4, torch.Generator().manual_seed(0), stream=True)
    assert prefix == p.dit.cfg.prefix and x0.shape[2] == p.dit.cfg.frames and sem.shape[1] == ctx["tok"].cfg.frames
    ck = torch.load(os.path.join(out, "dit.pt"), weights_only=True)  # a dit.pt from before the DiT had its own encoder
    del ck["text"]
    torch.save(ck, os.path.join(out, "dit.pt"))
    with pytest.raises(SystemExit, match="no text encoder of its own; re-train it with --stage dit"):
        train_tiny.main(["--out", out, "--stage", "control", "--steps", "2"])


@pytest.mark.uses("causal_conv")
def test_resume_after_an_interrupt_finishes_where_an_uninterrupted_run_does(tmp_path, monkeypatch, capsys):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    train_tiny.main(["--out", whole, "--stage", "vae", "--steps", "6"])
    calls, real = [0], vae.vae_loss

    def dies_at_step_4(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt  # Ctrl-C during the 4th step
        return real(*a, **k)
    monkeypatch.setattr(train_tiny, "SAVE_EVERY", 0)  # checkpoint after every step
    monkeypatch.setattr(vae, "vae_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_tiny.main(["--out", broken, "--stage", "vae", "--steps", "6"])
    assert torch.load(os.path.join(broken, "vae.pt"), weights_only=True)["step"] == 3
    monkeypatch.setattr(vae, "vae_loss", real)
    train_tiny.main(["--out", broken, "--stage", "vae", "--steps", "6", "--resume"])
    assert "resuming at step 3/6" in capsys.readouterr().out
    a, b = (torch.load(os.path.join(d, "vae.pt"), weights_only=True) for d in (whole, broken))
    assert a["step"] == b["step"] == 6 and a["config"] == b["config"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # same data, same noise, same optimizer: same weights


@pytest.mark.uses("fsq", "masks", "rope", "rope_3d")
def test_checkpoints_remember_their_seed_for_eval_and_resume(tmp_path):
    out = str(tmp_path / "s3")
    assert train_tiny.recorded_seed(out) == 0  # nothing trained yet
    train_tiny.main(["--out", out, "--stage", "tokenizer", "--steps", "1", "--seed", "3"])
    assert torch.load(os.path.join(out, "tokenizer.pt"), weights_only=True)["seed"] == 3
    assert train_tiny.recorded_seed(out) == 3  # what --stage eval and --resume use when --seed is not given


def test_a_stage_takes_the_other_chains_cores_once_that_chain_is_done(tmp_path):
    threads = torch.get_num_threads()
    args = argparse.Namespace(out=str(tmp_path), seed=0, steps=2, resume=False, threads=threads + 1)
    model = torch.nn.Linear(2, 1)
    running, done = Future(), threading.Event()  # the two signals main() hands over: the VAE + DiT's, the LM's
    done.set()

    def loss():
        return model(torch.ones(1, 2)).square().sum()
    try:
        train_tiny.fit("lm", args, {"model": model}, loss, vae.PRESETS["tiny"], torch.Generator(), beside=running.done)
        assert torch.get_num_threads() == threads  # the other chain still trains beside it: its cores are not free
        train_tiny.fit("dit", args, {"model": model}, loss, vae.PRESETS["tiny"], torch.Generator(), beside=done.is_set)
        assert torch.get_num_threads() == threads + 1  # done: the stage runs on every core from its next step
    finally:
        torch.set_num_threads(threads)
