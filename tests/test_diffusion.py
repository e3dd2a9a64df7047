"""diffusion.py: patchify, attention paths, zero-init identity, sampler invariants, sizes, overfit."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import diffusion
from diffusion import PRESETS, ControlNet, DiT, euler_sample, fm_loss, patchify, unpatchify

CFG = PRESETS["tiny"]


def inputs(cfg=CFG, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w, generator=g)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    sem = torch.randn(B, cfg.frames, cfg.sem_dim, *cfg.sem_hw, generator=g)
    return x, torch.rand(B, generator=g), text, sem


def models(cfg=CFG, seed=0):
    """A base with all weights perturbed, zero-inits included (so its output is not trivially 0),
    and a fresh branch copied from it (perturb(ctrl) makes the branch act too)."""
    torch.manual_seed(seed)
    dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit, ControlNet.from_dit(dit)


def perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_patchify_unpatchify_inverse_and_token_order():
    for cfg in (CFG, dataclasses.replace(CFG, patch=4, lat_w=12)):
        x = inputs(cfg)[0]
        tok = patchify(x, cfg.patch)
        T, h, w = cfg.grid
        p = cfg.patch
        assert tok.shape == (2, cfg.tokens, cfg.latent_ch * p * p)
        assert torch.equal(unpatchify(tok, cfg), x)
        n = (1 * h + 1) * w + (w - 1)  # token of frame 1, row 1, last column
        patch = x[:, :, 1, p:2 * p, (w - 1) * p:]  # (B, C, p, p)
        assert torch.equal(tok[:, n], patch.reshape(2, -1))


@pytest.mark.exercise("attention", points=2)
@pytest.mark.uses("controlnet", "expert_adaln")
def test_manual_attention_equals_sdpa_through_the_model():
    dit, ctrl = models()
    perturb(ctrl)
    manual = dataclasses.replace(CFG, attn_impl="manual")
    dit_m, ctrl_m = DiT(manual), ControlNet(manual)
    dit_m.load_state_dict(dit.state_dict())
    ctrl_m.load_state_dict(ctrl.state_dict())
    x, t, text, sem = inputs()
    with torch.no_grad():
        a = dit(x, t, text, ctrl(x, t, text, sem))
        b = dit_m(x, t, text, ctrl_m(x, t, text, sem))
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.exercise("controlnet", points=3)
@pytest.mark.uses("expert_adaln")
def test_zero_inits():
    x, t, text, sem = inputs()
    fresh = DiT(CFG)
    assert torch.equal(fresh(x, t, text), torch.zeros_like(x))  # untrained DiT predicts v = 0
    dit, ctrl = models()
    with torch.no_grad():
        base = dit(x, t, text)
        combined = dit(x, t, text, ctrl(x, t, text, sem))
    assert base.abs().max() > 0.1
    assert torch.equal(base, combined)  # a fresh branch changes nothing, bit for bit
    copied = list(ctrl.embed.parameters()) + list(ctrl.blocks.parameters())
    original = list(dit.embed.parameters()) + list(dit.blocks[:CFG.control_depth].parameters())
    assert all(torch.equal(a, b) for a, b in zip(copied, original, strict=True))
    perturb(ctrl.zero)  # ... because of the zero linears: once they move, the branch acts
    with torch.no_grad():
        assert (dit(x, t, text, ctrl(x, t, text, sem)) - base).abs().max() > 1e-3


class Oracle(torch.nn.Module):
    """The exact velocity of the straight path from noise to `target`: v = (x − target) / t."""

    def __init__(self, cfg, target):
        super().__init__()
        self.cfg, self.target, self.seen = cfg, target, None

    def forward(self, x, t, text, control=None):
        self.seen = x.clone()
        return (x - self.target) / t.view(-1, 1, 1, 1, 1)


@pytest.mark.exercise("euler", points=3)
@pytest.mark.exercise("flow_matching", points=3)
def test_oracle_velocity_lands_on_target_and_loss_skips_prefix():
    cfg = dataclasses.replace(CFG, shift=3.0)
    target, _, text, _ = inputs(cfg, seed=1)
    noise = inputs(cfg, seed=2)[0]
    out = euler_sample(Oracle(cfg, target), noise, text, steps=7)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    # fm_loss: with the oracle the loss is 0 on generated frames; the prefix is clean and not scored
    p = cfg.prefix
    oracle = Oracle(cfg, target)
    loss = fm_loss(oracle, target, text, prefix=p, generator=torch.Generator().manual_seed(0))
    assert loss < 1e-8
    assert torch.equal(oracle.seen[:, :, :p], target[:, :, :p])
    assert not torch.equal(oracle.seen[:, :, p:], target[:, :, p:])
    assert fm_loss(oracle, target, text, prefix=0, generator=torch.Generator().manual_seed(0)) < 1e-8


@pytest.mark.exercise("streaming", points=3)
@pytest.mark.uses("controlnet", "euler", "expert_adaln")
def test_streaming_prefix_held_fixed():
    dit, ctrl = models()
    perturb(ctrl)
    _, _, text, sem = inputs()
    noise = torch.randn(2, CFG.latent_ch, 9, CFG.lat_h, CFG.lat_w)[:, :, 2:7]  # a window sliced from a long clip
    p = CFG.prefix
    prefix = torch.randn(2, CFG.latent_ch, p, CFG.lat_h, CFG.lat_w)
    kw = dict(steps=3, guidance=2.0, controlnet=ctrl, sem=sem)
    a = euler_sample(dit, noise, text, prefix=prefix, **kw)
    b = euler_sample(dit, noise, text, prefix=prefix + 1, **kw)
    assert torch.equal(a[:, :, :p], prefix)
    assert (a[:, :, p:] - b[:, :, p:]).abs().max() > 1e-3  # the new frames do look at the prefix


@pytest.mark.exercise("euler", points=4)
@pytest.mark.uses("controlnet", "expert_adaln")
def test_guidance_one_is_conditional_and_guidance_formula():
    dit, ctrl = models()
    perturb(ctrl)
    noise, _, text, sem = inputs()
    one = torch.ones(2)
    with torch.no_grad():
        v_c = dit(noise, one, text, ctrl(noise, one, text, sem))
        v_u = dit(noise, one, 0 * text, ctrl(noise, one, 0 * text, sem))
    assert (v_c - v_u).abs().max() > 1e-3  # the text matters, so the check below can fail
    kw = dict(steps=1, controlnet=ctrl, sem=sem)  # one Euler step from t = 1 to 0: x0 = noise − v
    torch.testing.assert_close(euler_sample(dit, noise, text, guidance=1.0, **kw), noise - v_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(euler_sample(dit, noise, text, guidance=4.0, **kw),
                               noise - (v_u + 4.0 * (v_c - v_u)), atol=1e-5, rtol=0)


@pytest.mark.uses("euler", "expert_adaln", "flow_matching")
def test_time_reaches_the_embedding_in_fp32_under_bf16(monkeypatch):
    """A bf16 model must see the same times as an fp32 one: the shifted grid of euler_sample and the
    logit-normal draws of fm_loss, not their bf16 roundings (up to 4e-3 near t = 1)."""
    seen = []
    embedding = diffusion.timestep_embedding

    def spy(t, dim, max_period=10000.0):
        seen.append(t.detach().clone())
        return embedding(t, dim, max_period)
    monkeypatch.setattr(diffusion, "timestep_embedding", spy)
    cfg = dataclasses.replace(CFG, shift=3.0)
    x, _, text, _ = inputs(cfg)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        dit = DiT(cfg).to(dtype)
        seen.clear()
        euler_sample(dit, x.to(dtype), text.to(dtype), steps=7)
        fm_loss(dit, x.to(dtype), text.to(dtype), generator=torch.Generator().manual_seed(0))
        runs[dtype] = list(seen)
    assert len(runs[torch.bfloat16]) == 8 and all(t.dtype == torch.float32 for t in runs[torch.bfloat16])
    assert all(torch.equal(a, b) for a, b in zip(runs[torch.float32], runs[torch.bfloat16], strict=True))
    assert any((t != t.bfloat16().float()).any() for t in runs[torch.bfloat16])  # bf16 would have rounded these


@pytest.mark.uses("controlnet", "expert_adaln")
def test_token_counts_and_full_size_on_meta():
    x, t, text, sem = inputs()
    dit = DiT(CFG)
    txt, vid, emb = dit.embed(x, t, text)
    assert (CFG.tokens, CFG.seq) == (5 * 4 * 4, 88) and txt.shape[1] == 8 and vid.shape[1] == 80  # 8x8 latents, patch 2
    full = PRESETS["full"]
    assert (full.tokens, full.text_len, full.seq) == (13 * 30 * 45, 226, 17_776)
    with torch.device("meta"):
        dit, ctrl = DiT(full), ControlNet(full)
        x, t = torch.empty(1, 16, 13, 60, 90), torch.empty(1)
        text, sem = torch.empty(1, 226, 4096), torch.empty(1, 13, 768, 30, 45)
        txt, vid, _ = dit.embed(x, t, text)
        control = ctrl(x, t, text, sem)
        v = dit(x, t, text, control)
    assert txt.shape == (1, 226, 1920) and vid.shape == (1, 17_550, 1920)
    assert len(control) == 15 and all(c.shape == (1, 17_776, 1920) for c in control)
    assert v.shape == x.shape
    n_dit = sum(p.numel() for p in dit.parameters())
    n_ctrl = sum(p.numel() for p in ctrl.parameters())
    assert abs(n_dit / 1_693_783_872 - 1) < 0.01
    assert abs(n_ctrl / 945e6 - 1) < 0.03


def test_bad_input_says_what_fits():
    dit, ctrl = models()
    x, t, text, sem = inputs()
    bad = [
        lambda: dit(x[:, :, :4], t, text),  # 4 latent frames, config has 5
        lambda: dit(x[..., :7], t, text),  # width 7 is not a multiple of patch 2
        lambda: dit(torch.randn(2, 8, 5, 12, 12), t, text),  # patchifies, but not this config's size
        lambda: dit(x, t, text[..., :64]),  # text width
        lambda: dit(x, t, text[:, :5]),  # text length
        lambda: ctrl(x, t, text, sem[:, :, :32]),  # semantic width
        lambda: euler_sample(dit, x, text, steps=1, prefix=x),  # prefix as long as the window
        lambda: euler_sample(dit, x, text, steps=0),  # no step: the noise itself would come back
        lambda: euler_sample(dit, x, text, steps=2, guidance=-1.0),
        lambda: euler_sample(DiT(dataclasses.replace(CFG, prediction="v")), x, text, steps=1),  # without its parameterization
        lambda: fm_loss(dit, x, text, prefix=CFG.frames),
        lambda: dataclasses.replace(CFG, prefix=5),
        lambda: dataclasses.replace(CFG, attn_impl="flash"),
        lambda: dataclasses.replace(CFG, gelu="exact"),  # "none" (exact) or "tanh", as F.gelu names them
    ]
    for f in bad:
        with pytest.raises(ValueError):
            f()


@pytest.mark.exercise("flow_matching", points=3)
@pytest.mark.uses("expert_adaln")
def test_overfit_lowers_fm_loss():
    torch.manual_seed(0)
    dit = DiT(CFG)
    x0, _, text, sem = inputs(B=4, seed=3)

    def eval_loss(**kw):
        dit.eval()
        with torch.no_grad():
            return fm_loss(dit, x0, text, generator=torch.Generator().manual_seed(123), **kw).item()

    start = eval_loss()
    opt = torch.optim.Adam(dit.parameters(), lr=3e-3)
    dit.train()
    for _ in range(250):
        loss = fm_loss(dit, x0, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    print(f"overfit: FM loss {start:.3f} -> {end:.3f}")
    assert end < 0.5 * start


@pytest.mark.exercise("controlnet", points=2)
@pytest.mark.uses("expert_adaln", "flow_matching")
def test_branch_trains_through_a_frozen_base():
    dit, ctrl = models()
    dit.requires_grad_(False)
    before = [p.clone() for p in dit.parameters()]
    x0, _, text, _ = inputs(B=4, seed=4)
    r = CFG.lat_h // CFG.sem_hw[0]  # the features' grid is r x coarser than the latents': fold r x r into channels
    sem = F.pixel_unshuffle(x0.transpose(1, 2).flatten(0, 1), r)  # (B*T, C*r*r, h, w): x0 itself, rearranged
    sem = sem.unflatten(0, x0.shape[:1] + x0.shape[2:3]).repeat(1, 1, CFG.sem_dim // sem.shape[1], 1, 1)  # (B, T, sem_dim, h, w)

    def eval_loss():
        ctrl.eval()
        with torch.no_grad():
            return fm_loss(dit, x0, text, ctrl, sem, generator=torch.Generator().manual_seed(7)).item()

    start = eval_loss()
    opt = torch.optim.Adam(ctrl.parameters(), lr=5e-3)
    ctrl.train()
    for _ in range(60):
        loss = fm_loss(dit, x0, text, ctrl, sem)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    print(f"branch: FM loss {start:.3f} -> {end:.3f}")
    assert end < 0.8 * start
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, dit.parameters()))
