"""tokenizer.py: FSQ exactness, the two masks (who sees whom), frame causality, the two attention
paths, shapes and bad input, the full preset's counts on meta, and a short overfit."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tokenizer import (PRESETS, FSQ, FrozenPatchFeatures, SemanticTokenizer, TokenizerConfig, attention,
                       codebook_usage, decoder_mask, encoder_mask, token_times, tokenizer_loss)

TINY = PRESETS["tiny"]


def _bounded_to_z(fsq, bounded):
    """Inverse of FSQ's bound: the input z whose bounded value is `bounded` (..., D)."""
    half_l = (fsq.levels - 1) * (1 + 1e-3) / 2
    offset = (fsq.levels % 2 == 0).float() * 0.5
    return torch.atanh((bounded + offset) / half_l) - torch.atanh(offset / half_l)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 4), (3, 4)])
@pytest.mark.exercise("fsq", points=2)
def test_fsq_round_trip_every_index(levels):
    fsq = FSQ(levels)
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)  # (K, D)
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size  # every index is its own grid point
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # the input that bounds exactly onto each grid point quantizes back to it
    codes2, idx2 = fsq(_bounded_to_z(fsq, codes * (fsq.levels // 2)))
    assert torch.equal(idx2, idx) and torch.equal(codes2, codes)


@pytest.mark.exercise("fsq", points=4)
def test_fsq_codes_on_grid_and_straight_through():
    torch.manual_seed(0)
    fsq = FSQ((8, 5, 5, 5))
    half_width = torch.tensor([4, 2, 2, 2])
    z = (torch.randn(4096, 4) * 2).requires_grad_()
    codes, idx = fsq(z)
    steps = codes * half_width  # integer level of each channel
    assert torch.equal(steps, steps.round())
    assert steps.min(0).values.tolist() == [-4, -2, -2, -2] and steps.max(0).values.tolist() == [3, 2, 2, 2]
    assert idx.dtype == torch.long and idx.min() >= 0 and idx.max() < 1000
    # straight-through: the gradient is that of the smooth bound tanh(z + shift)·half_l / half_width
    g = torch.randn_like(codes)
    (codes * g).sum().backward()
    half_l = torch.tensor([7.0, 4.0, 4.0, 4.0]) * (1 + 1e-3) / 2
    shift = torch.atanh(torch.tensor([0.5, 0, 0, 0]) / half_l)
    expected = g * (1 - torch.tanh(z.detach() + shift) ** 2) * half_l / half_width
    torch.testing.assert_close(z.grad, expected)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        fsq(torch.zeros(2, 3))


@pytest.mark.exercise("attention", points=2)
@pytest.mark.uses("masks")
def test_attention_manual_matches_sdpa():
    torch.manual_seed(0)
    time, is_frame = token_times(3, 4, 3, 2)
    q, k, v = torch.randn(3, 2, 2, len(time), 8).unbind(0)
    for mask in (encoder_mask(time, is_frame), decoder_mask(time), None):
        torch.testing.assert_close(attention(q, k, v, mask, "manual"), attention(q, k, v, mask, "sdpa"))


@pytest.mark.exercise("attention", points=2)
@pytest.mark.uses("fsq", "masks", "rope", "rope_3d")
def test_model_manual_matches_sdpa():
    torch.manual_seed(0)
    sdpa = SemanticTokenizer(TINY).eval()
    manual = SemanticTokenizer(dataclasses.replace(TINY, attn_impl="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    feats = torch.randn(2, TINY.frames, TINY.feat_dim, TINY.feat_h, TINY.feat_w)
    codes = sdpa.quantizer.indices_to_codes(torch.randint(0, TINY.codebook_size, (2, TINY.n_tokens)))
    with torch.no_grad():
        torch.testing.assert_close(manual.encoder(feats), sdpa.encoder(feats), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(manual.decoder(codes), sdpa.decoder(codes), atol=1e-5, rtol=1e-5)


def _rule_masks(frames, hw, n_i, n_p):
    """docs/DESIGN.md §3 written out pair by pair on sequence positions (the release's own form)."""
    nf = frames * hw
    S = nf + n_i + (frames - 1) * n_p
    group = lambda j: 0 if j < nf + n_i else (j - nf - n_i) // n_p + 1  # group of a query position
    enc, dec = torch.zeros(S, S, dtype=torch.bool), torch.zeros(S, S, dtype=torch.bool)
    for a in range(S):
        for b in range(S):
            if a < nf:  # a frame (encoder) / mask (decoder) token of frame a // hw
                enc[a, b] = b < nf and b // hw <= a // hw
                dec[a, b] = b // hw <= a // hw if b < nf else group(b) <= a // hw
            else:  # a query / latent of group(a)
                enc[a, b] = b // hw <= group(a) if b < nf else b <= a
                dec[a, b] = b // hw <= group(a) if b < nf else group(b) <= group(a)
    return enc, dec


def _visible_pairs(time, is_frame):
    """Visible (query, key) pairs of both masks from the index vectors alone: O(S), never (S, S)."""
    frames_at = torch.bincount(time[is_frame]).long()  # frame tokens per time
    tokens_at = torch.bincount(time).long()  # all tokens per time
    n_q = int((~is_frame).sum())
    enc = (tokens_at * frames_at.cumsum(0)).sum() + n_q * (n_q + 1) // 2  # frames <= t, plus causal queries
    dec = (tokens_at * tokens_at.cumsum(0)).sum()  # everything of time <= t
    return int(enc), int(dec)


@pytest.mark.parametrize("frames,hw,n_i,n_p", [(3, 4, 3, 2), (5, 16, 8, 4)])  # a toy layout, the tiny preset
@pytest.mark.exercise("masks", points=3)
def test_mask_structure(frames, hw, n_i, n_p):
    assert (5, 16, 8, 4) == (TINY.frames, TINY.feat_h * TINY.feat_w, TINY.n_i, TINY.n_p)
    time, is_frame = token_times(frames, hw, n_i, n_p)
    enc, dec = _rule_masks(frames, hw, n_i, n_p)
    assert torch.equal(encoder_mask(time, is_frame), enc)
    assert torch.equal(decoder_mask(time), dec)
    assert _visible_pairs(time, is_frame) == (int(enc.sum()), int(dec.sum()))


@pytest.mark.exercise("masks", points=2)
@pytest.mark.uses("fsq", "rope", "rope_3d")
def test_full_preset_counts_on_meta():
    full = PRESETS["full"]
    assert (full.n_tokens, full.codebook_size) == (1218, 2048)
    hw = full.feat_h * full.feat_w
    time, is_frame = token_times(full.frames, hw, full.n_i, full.n_p)
    assert (len(time), int(is_frame.sum())) == (13 * 1350 + 1218, 17550)
    assert torch.bincount(time[~is_frame]).tolist() == [330] + [74] * 12
    n_at = lambda t: 1350 + (330 if t == 0 else 74)
    enc = (1350 ** 2 * 91  # frame tokens see frames <= their own
           + 1350 * (330 * 1 + sum(74 * (k + 1) for k in range(1, 13)))  # queries of group k see frames <= k
           + 1218 * 1219 // 2)  # queries see earlier queries
    dec = sum(n_at(t) * sum(n_at(u) for u in range(t + 1)) for t in range(13))
    assert _visible_pairs(time, is_frame) == (enc, dec) == (176_026_371, 189_696_768)
    with torch.device("meta"):  # shapes only: the full model's forward, masks and RoPE included
        model = SemanticTokenizer(full)
        feats = FrozenPatchFeatures(full)(torch.zeros(1, 3, 49, 480, 720))
        recon, ids = model(feats)
    assert tuple(feats.shape) == tuple(recon.shape) == (1, 13, 768, 30, 45) and tuple(ids.shape) == (1, 1218)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(model) / 174.5e6 - 1) < 0.03, count(model)
    assert len(model.encoder.blocks) == len(model.decoder.blocks) == 12
    assert model.encoder.blocks[0].qkv.bias is None and model.encoder.blocks[0].qkv.weight.shape == (2304, 768)


@pytest.mark.exercise("masks", points=4)
@pytest.mark.uses("fsq", "rope", "rope_3d")
def test_frame_causality_and_prefixes():
    torch.manual_seed(0)
    model = SemanticTokenizer(TINY).eval()
    ids = torch.randint(0, TINY.codebook_size, (2, TINY.n_tokens))
    full = model.decode(ids)
    for f in range(TINY.frames):
        n = TINY.n_i + f * TINY.n_p  # tokens of groups <= f
        changed = ids.clone()
        changed[:, n:] = torch.randint(0, TINY.codebook_size, changed[:, n:].shape)
        out = model.decode(changed)
        torch.testing.assert_close(out[:, : f + 1], full[:, : f + 1], atol=1e-6, rtol=0)
        if f < TINY.frames - 1:
            assert (out[:, f + 1:] - full[:, f + 1:]).abs().max() > 1e-3  # later frames do listen
        torch.testing.assert_close(model.decode(ids[:, :n]), full[:, : f + 1], atol=1e-5, rtol=1e-5)
    # the encoder is frame-causal too: tokens of groups <= f come from frames <= f
    feats = torch.randn(2, TINY.frames, TINY.feat_dim, TINY.feat_h, TINY.feat_w)
    with torch.no_grad():
        z = model.encoder(feats)
        for f in range(TINY.frames):
            n = TINY.n_i + f * TINY.n_p
            torch.testing.assert_close(model.encoder(feats[:, : f + 1]), z[:, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.uses("fsq", "masks", "rope", "rope_3d")
def test_shapes_features_and_bad_input():
    torch.manual_seed(0)
    model, source = SemanticTokenizer(TINY), FrozenPatchFeatures(TINY)
    video = torch.rand(2, 3, 17, 32, 32) * 2 - 1
    feats = source(video)
    shape = (TINY.feat_dim, TINY.feat_h, TINY.feat_w)  # (192, 4, 4): one vector per 8x8 patch
    assert feats.shape == (2, 5, *shape) and 0.1 < feats.pow(2).mean() < 2  # O(1) features
    torch.testing.assert_close(feats[:, 1], source(video[:, :, 4:5])[:, 0])  # semantic frame 1 = RGB frame 4
    torch.manual_seed(123)  # the feature weights ignore the global RNG
    assert torch.equal(FrozenPatchFeatures(TINY).weight, source.weight) and not list(source.parameters())
    ids = model.encode(feats)
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert model.decode(ids).shape == (2, 5, *shape)
    assert model.decode(ids[:, :12]).shape == (2, 2, *shape)
    recon, idx = model(feats)
    assert recon.shape == feats.shape and torch.equal(idx, ids)
    with pytest.raises(ValueError, match=r"\(B, T, 192, 4, 4\) with 1 <= T <= 5"):
        model.encode(feats[:, :, :32])
    with pytest.raises(ValueError, match=r"1 <= T <= 5"):
        model.encode(torch.cat([feats, feats[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        model.decode(torch.full((1, 24), 1000))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        model.decode(torch.full((1, 24), -1))
    with pytest.raises(ValueError, match=r"n_i \+ k·n_p"):
        model.decode(ids[:, :21])
    with pytest.raises(ValueError, match=r"1\+4k"):
        source(video[:, :, :16])
    with pytest.raises(ValueError, match="attn_impl"):
        TokenizerConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="rope_split"):
        TokenizerConfig(rope_split=(8, 12, 12))


def _moving_squares(n, seed=0):
    """n tiny clips (n, 3, 17, 32, 32): a coloured 8×8 square sliding 1 px per frame."""
    g = torch.Generator().manual_seed(seed)
    video = -torch.ones(n, 3, 17, 32, 32)
    for i in range(n):
        y, x = torch.randint(0, 8, (2,), generator=g).tolist()
        dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][i % 4]
        for t in range(17):
            y0, x0 = 8 + y + dy * t // 2, 8 + x + dx * t // 2
            video[i, :, t, y0:y0 + 8, x0:x0 + 8] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return video


@pytest.mark.uses("masks", "rope", "rope_3d")
def test_initialize_weights():
    torch.manual_seed(0)
    model = SemanticTokenizer(TINY)
    assert torch.count_nonzero(model.encoder.to_code.bias) == 0
    with torch.no_grad():
        z = model.encoder(FrozenPatchFeatures(TINY)(_moving_squares(2)))
    assert 0 < z.abs().max() < 0.5  # every token starts near the grid's centre, in tanh's linear range


@pytest.mark.uses("fsq", "masks", "rope", "rope_3d")
def test_overfit_lowers_loss():
    torch.manual_seed(0)
    model = SemanticTokenizer(TINY)
    feats = FrozenPatchFeatures(TINY)(_moving_squares(2))
    mean_only = F.mse_loss(feats.mean((0, 1, 3, 4), keepdim=True).expand_as(feats), feats).item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss = tokenizer_loss(model, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = tokenizer_loss(model, feats).item()
    idx = model.encode(feats)
    print(f"tiny overfit: feature MSE {losses[0]:.4f} -> {final:.4f} (per-channel mean predictor {mean_only:.4f})")
    # beating the mean predictor clearly means the tokens carry where and what the squares are
    assert final < 0.4 * losses[0] and final < 0.6 * mean_only, (losses[0], final, mean_only)
    used, perplexity = codebook_usage(idx, TINY.codebook_size)
    assert 0 < used <= 1 and 1 <= perplexity <= min(TINY.codebook_size, idx.numel())
