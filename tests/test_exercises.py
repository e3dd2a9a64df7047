"""Properties that the other test files check only through a whole model: RoPE's relative
positions and pair convention, the 3D positions of the tokenizer, the LM's sampling filters, the
expert adaLN's two sets of modulation, and how ControlNet's residuals are wired in. Each test states
the property from the paper's side (docs/EXERCISES.md), so that a student's code can be graded by it."""
import dataclasses
import math

import pytest
import torch

import diffusion
import lm
import tokenizer


@pytest.mark.exercise("rope", points=3)
@pytest.mark.parametrize("module", [tokenizer, lm], ids=["tokenizer", "lm"])
def test_rope_scores_depend_on_relative_position_only(module):
    g = torch.Generator().manual_seed(0)
    n_pairs = 8
    q, k = torch.randn(2, n_pairs * 2, generator=g)
    pos = torch.tensor([0, 3, 7, 20, 23, 27])

    def turned(x, p):
        angles = module.rope_angles(pos[p:p + 1], n_pairs)  # (1, n_pairs)
        return module.apply_rope(x[None], angles.cos(), angles.sin())[0]

    # (0, 3) and (20, 23) are 3 apart, (3, 7) and (23, 27) 4 apart: the same scores
    assert torch.allclose(turned(q, 0) @ turned(k, 1), turned(q, 3) @ turned(k, 4), atol=1e-4)
    assert torch.allclose(turned(q, 1) @ turned(k, 2), turned(q, 4) @ turned(k, 5), atol=1e-4)
    assert not torch.allclose(turned(q, 0) @ turned(k, 1), turned(q, 0) @ turned(k, 2), atol=1e-2)
    assert torch.allclose(turned(q, 0), q)  # position 0 turns nothing
    assert torch.allclose(turned(q, 3).norm(), q.norm())  # a rotation keeps the length


@pytest.mark.exercise("rope", points=2)
@pytest.mark.parametrize("module", [tokenizer, lm], ids=["tokenizer", "lm"])
def test_rope_turns_adjacent_pairs_at_falling_frequencies(module):
    n_pairs, theta = 4, 10000.0
    angles = module.rope_angles(torch.tensor([1, 2]), n_pairs, theta)  # (2, 4)
    want = torch.tensor([theta ** (-i / n_pairs) for i in range(n_pairs)])
    torch.testing.assert_close(angles, torch.stack([want, 2 * want]))
    x = torch.arange(1.0, 9.0)  # pairs (1, 2), (3, 4), (5, 6), (7, 8)
    quarter = torch.full((1, n_pairs), math.pi / 2)
    out = module.apply_rope(x[None], quarter.cos(), quarter.sin())[0]  # each pair turned by 90 degrees
    torch.testing.assert_close(out, torch.tensor([-2.0, 1, -4, 3, -6, 5, -8, 7]), atol=1e-6, rtol=0)


@pytest.mark.exercise("rope_3d", points=3)
@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.uses("masks", "rope")
def test_rope_3d_positions(decoder):
    frames, h, w = 3, 2, 3  # a toy layout: 3 frames of 2x3 tokens
    n_i, n_p = 4, 2
    split = (2, 3, 3)  # rotary pairs for time, rows, columns
    cos, sin, mask = tokenizer.sequence_layout(frames, h, w, n_i, n_p, split, decoder, torch.device("cpu"))
    n_frame_tokens = frames * h * w
    n_queries = n_i + (frames - 1) * n_p
    assert cos.shape == sin.shape == (n_frame_tokens + n_queries, sum(split))
    angles = torch.atan2(sin, cos)  # (S, pairs), in (-pi, pi]
    time, is_frame = tokenizer.token_times(frames, h * w, n_i, n_p)
    want_mask = tokenizer.decoder_mask(time) if decoder else tokenizer.encoder_mask(time, is_frame)
    assert torch.equal(mask, want_mask)

    def expected(position):  # (t, row, col) -> the angles of all pairs, band by band
        bands = [tokenizer.rope_angles(torch.tensor([p]), n)[0] for p, n in zip(position, split)]
        return torch.atan2(torch.cat(bands).sin(), torch.cat(bands).cos())

    for index, position in ((0, (0, 0, 0)), (4, (0, 1, 1)), (2 * h * w + 5, (2, 1, 2))):  # row-major frame tokens
        torch.testing.assert_close(angles[index], expected(position), atol=1e-5, rtol=0)
    for n in (0, 1, n_queries - 1):  # query n sits at (n, n, n)
        torch.testing.assert_close(angles[n_frame_tokens + n], expected((n, n, n)), atol=1e-5, rtol=0)


def _logits(rows=4000, vocab=12, seed=0):
    """The same row of logits repeated, so that many draws show which ids can be drawn."""
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2
    return row.expand(rows, -1).clone()


@pytest.mark.exercise("lm_sampling", points=3)
def test_sampling_filters_keep_exactly_the_top_ids():
    logits = _logits()
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[order]
    g = torch.Generator().manual_seed(1)
    drawn = lm._pick(logits, 1.0, 1.0, 3, None, g).unique()
    assert set(drawn.tolist()) == set(order[:3].tolist())  # top-k: the k likeliest ids, each of them drawn
    top_p = float(probs[:2].sum() + 1e-3)  # the two likeliest just fail to reach top_p: a third id is needed
    drawn = lm._pick(logits, 1.0, 1.0, None, top_p, g).unique()
    assert set(drawn.tolist()) == set(order[:3].tolist())
    drawn = lm._pick(logits, 1.0, 1.0, None, float(probs[0]) / 2, g).unique()
    assert drawn.tolist() == [order[0].item()]  # the likeliest id alone already holds top_p
    assert torch.equal(lm._pick(logits, 1.0, 0.0, None, None, g), logits.argmax(-1))  # temperature 0: greedy


@pytest.mark.exercise("lm_sampling", points=2)
def test_sampling_guidance_combines_the_two_halves():
    cond, uncond = _logits(rows=3, seed=2), _logits(rows=3, seed=3)
    both = torch.cat([cond, uncond])
    for guidance in (0.0, 1.5, 4.0):
        want = (uncond + guidance * (cond - uncond)).argmax(-1)
        assert torch.equal(lm._pick(both, guidance, 0.0, None, None, None), want), guidance
    hot = lm._pick(_logits(), 1.0, 5.0, None, None, torch.Generator().manual_seed(0))
    cold = lm._pick(_logits(), 1.0, 0.2, None, None, torch.Generator().manual_seed(0))
    assert hot.unique().numel() > cold.unique().numel()  # temperature flattens the distribution


@pytest.mark.exercise("expert_adaln", points=3)
def test_expert_adaln_modulates_text_and_video_apart():
    D, time_dim = 8, 5
    norm = torch.nn.LayerNorm(D, elementwise_affine=False)
    ada = torch.nn.Linear(time_dim, 6 * D)
    g = torch.Generator().manual_seed(0)
    chunks = torch.randn(6, D, generator=g)  # video shift, scale, gate, then text shift, scale, gate
    with torch.no_grad():
        ada.weight.zero_()
        ada.bias.copy_(chunks.flatten())  # the chunks, whatever the time embedding
    emb = torch.randn(2, time_dim, generator=g)
    txt = torch.randn(2, 3, D, generator=g)  # 3 text tokens
    vid = torch.randn(2, 7, D, generator=g)  # 7 video tokens
    h_txt, h_vid, g_txt, g_vid = diffusion.expert_adaln(norm, ada, emb, txt, vid)
    torch.testing.assert_close(h_vid, norm(vid) * (1 + chunks[1]) + chunks[0])
    torch.testing.assert_close(h_txt, norm(txt) * (1 + chunks[4]) + chunks[3])
    torch.testing.assert_close(g_vid.expand(2, 7, D), chunks[2].expand(2, 7, D))
    torch.testing.assert_close(g_txt.expand(2, 3, D), chunks[5].expand(2, 3, D))
    with torch.no_grad():
        ada.weight.normal_(generator=g)  # now the modulation follows each sample's time embedding
    same_video = vid[:1].expand(2, -1, -1)
    h_vid = diffusion.expert_adaln(norm, ada, emb, txt, same_video)[1]
    assert (h_vid[0] - h_vid[1]).abs().max() > 1e-3


@pytest.mark.exercise("controlnet", points=3)
@pytest.mark.uses("expert_adaln")
def test_control_residuals_are_added_after_their_blocks():
    cfg = dataclasses.replace(diffusion.PRESETS["tiny"], depth=2, control_depth=2)
    torch.manual_seed(0)
    dit, net = diffusion.DiT(cfg).eval(), diffusion.ControlNet(cfg).eval()
    with torch.no_grad():
        for p in [*dit.parameters(), *net.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    t = torch.rand(1, generator=g)
    sem = torch.randn(1, cfg.frames, cfg.sem_dim, *cfg.sem_hw, generator=g)
    L = cfg.text_len
    with torch.no_grad():
        residuals = net(x, t, text, sem)
        # the branch: embeddings of x + hint, then each block's output through its zero linear feeds the next block
        txt, vid, emb = net.embed(x + net.hint(sem), t, text)
        for i, (block, zero) in enumerate(zip(net.blocks, net.zero)):
            h = zero(torch.cat(block(txt, vid, emb), dim=1))
            torch.testing.assert_close(residuals[i], h)
            txt, vid = h[:, :L], h[:, L:]
        # the base: residual i joins every token (text and video) right after base block i
        control = [torch.randn(1, cfg.seq, cfg.width, generator=g) for _ in range(cfg.depth)]
        seen = []
        hooks = [dit.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out)),
                 dit.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[:2]))]
        dit(x, t, text, control)
        for hook in hooks:
            hook.remove()
        (txt0, vid0), (txt1, vid1) = seen
        torch.testing.assert_close(txt1, txt0 + control[0][:, :L])
        torch.testing.assert_close(vid1, vid0 + control[0][:, L:])
        torch.testing.assert_close(dit(x, t, text, [torch.zeros_like(c) for c in control]), dit(x, t, text))
        assert (dit(x, t, text, control) - dit(x, t, text, control[:1])).abs().max() > 1e-3  # the last one counts too
