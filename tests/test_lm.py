"""lm.py: KV cache == full forward, causality, CFG, stream structure, loss at init, overfit,
manual == SDPA, the text vocabulary round trip, bad input, and the full size on meta."""
import dataclasses
import io
import math

import pytest
import torch

from lm import PRESETS, SPECIALS, LMConfig, SemanticLM, TextEncoder, code_digits, generate, lm_loss, token_layout

CFG = dataclasses.replace(PRESETS["tiny"], codebook_size=50, code_levels=(2, 5, 5), n_i=6, n_p=2, frames=3, width=64,
                          depth=2, heads=4, mlp=128, text_dim=32, text_len=6, text_heads=2, text_mlp=64)
CAPTIONS = ["a red circle moving left", "a blue square moves up", "green triangle going down",
            "a square, yellow, moving right"]


def _model(cfg=CFG, seed=0):
    """An untrained model with a 10x head, so its logits (std ~1.5) are far from uniform."""
    torch.manual_seed(seed)
    m = SemanticLM(cfg).eval()
    with torch.no_grad():
        m.head.weight.mul_(10.0)
        for mlp in m.micro.values():  # wake the zero-initialised micro-condition layers
            mlp[2].weight.normal_(std=0.1)
    return m


def _inputs(B=2, cfg=CFG, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    return text, torch.tensor([3, 9][:B]), torch.tensor([0.5, 1.25][:B])


def _stream(m, B=2, n=30, seed=2):
    text, frames, motion = _inputs(B)
    ids = torch.randint(m.cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(seed))
    return torch.cat([m.prefix(text, frames, motion), m.embed_ids(ids)], dim=1)  # (B, P + n, W)


@torch.no_grad()
@pytest.mark.exercise("kv_cache", points=5)
@pytest.mark.uses("lm_sampling", "lm_sequence", "rope")
def test_kv_cache_equals_full_forward():
    m = _model()
    x = _stream(m)
    full = m(x)
    cache = m.new_cache(2, x.shape[1])
    parts = [m(x[:, :11], cache)] + [m(x[:, i:i + 1], cache, i) for i in range(11, 20)] + [m(x[:, 20:], cache, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    # the same sampler with and without the cache: identical tokens, one and two segments, CFG, top-k / top-p
    text, frames, motion = _inputs()
    for kw in (dict(guidance=2.0, top_k=20), dict(n_segments=2, top_p=0.9, temperature=0.8), dict(temperature=0.0)):
        a, b = (generate(m, text, frames, motion, generator=torch.Generator().manual_seed(7), use_cache=c, **kw)
                for c in (True, False))
        assert torch.equal(a, b), kw
        assert a.unique().numel() > 5  # a real sample, not a constant


@torch.no_grad()
@pytest.mark.uses("rope")
def test_causality():
    m = _model()
    x = _stream(m)
    t = 20
    y = x.clone()
    y[:, t] += 1.0
    lx, ly = m(x), m(y)
    assert (lx[:, :t] - ly[:, :t]).abs().max() < 1e-6  # bitwise equal here; a tolerance for other kernels
    assert (lx[:, t:] - ly[:, t:]).abs().amax(-1).min() > 1e-3  # t and everything after it do change


@torch.no_grad()
def _greedy(m, text, frames, motion, keep):
    """Reference greedy decoder: full forwards, structure forced from token_layout, codes argmax."""
    layout = token_layout(m.cfg, 1)[:-1].tolist()
    x, out = m.prefix(text, frames, motion, keep), []
    for tok in layout:
        if tok < 0:
            tok = m(x)[:, -1, :m.cfg.codebook_size].argmax(-1)
            out.append(tok)
        else:
            tok = torch.full((x.shape[0],), tok)
        x = torch.cat([x, m.embed_ids(tok)[:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.exercise("lm_sampling", points=3)
@pytest.mark.uses("kv_cache", "lm_sequence", "rope")
def test_cfg_rows():
    """Scale 1 is the conditional model; scale 0 the unconditional one (null text at cfg.null_motion, or with
    None, as the release, at each row's own motion); a scale just above 1 runs both rows and equals the first."""
    text, frames, motion = _inputs()
    null_text = torch.zeros(2, dtype=torch.bool)
    for null_motion in (CFG.null_motion, None):
        m = _model(dataclasses.replace(CFG, null_motion=null_motion))  # the same weights either way
        cond = _greedy(m, text, frames, motion, None)
        uncond = _greedy(m, text, frames, motion if null_motion is None else null_motion, null_text)
        assert not torch.equal(cond, uncond)
        for scale, want in ((1.0, cond), (1.0 + 1e-6, cond), (0.0, uncond)):
            assert torch.equal(generate(m, text, frames, motion, guidance=scale, temperature=0.0), want), scale
    assert not torch.equal(uncond, _greedy(m, text, frames, CFG.null_motion, null_text))  # the two null rows differ


@pytest.mark.parametrize("n_segments", [1, 2])
@pytest.mark.exercise("lm_sequence", points=3)
@pytest.mark.uses("kv_cache", "lm_sampling", "rope")
def test_structure_tokens_in_place(n_segments):
    """What generate feeds the model is exactly token_layout with the sampled codes in its code slots, even
    when the model would much rather say a structure token; counts per segment are right."""
    cfg, m = CFG, _model()
    with torch.no_grad():
        m.head.weight[cfg.codebook_size:] *= 50  # the head now prefers special ids everywhere
    fed = []
    hook = m.embed.register_forward_hook(lambda mod, inp, out: fed.append(inp[0]))
    text, frames, motion = _inputs()
    codes = generate(m, text, frames, motion, n_segments=n_segments, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert codes.shape == (2, n_segments * cfg.tokens_per_segment) and codes.max() < cfg.codebook_size
    stream = torch.cat([f.view(2, -1) for f in fed[2:]], 1)  # fed[0]: BOS, SOI of the prefix; fed[1]: no prefix codes
    layout = token_layout(cfg, n_segments)
    want = layout.expand(2, -1).clone()
    want[:, layout < 0] = codes
    assert torch.equal(stream, want[:, :-2])  # all went in but the last EOP and the EOS, which predict nothing
    counts = {name: (layout == getattr(cfg, name)).sum().item() for name in SPECIALS}
    assert counts == dict(EOS=1, BOS=0, SOI=n_segments - 1, EOI=n_segments, SOP=n_segments * (cfg.frames - 1),
                          EOP=n_segments * (cfg.frames - 1), PAD=0)  # + the prefix's SOI = n_segments
    assert (layout < 0).sum() == n_segments * cfg.tokens_per_segment == n_segments * (cfg.n_i + 2 * cfg.n_p)


@pytest.mark.exercise("lm_sequence", points=2)
@pytest.mark.uses("kv_cache", "lm_sampling", "rope")
def test_prefix_codes_continue_the_stream():
    m = _model()
    text, frames, motion = _inputs()
    both = generate(m, text, frames, motion, n_segments=2, temperature=0.0)
    tps = CFG.tokens_per_segment
    calls = []
    second = generate(m, text, frames, motion, prefix_codes=both[:, :tps], temperature=0.0,
                      progress=lambda i, n: calls.append((i, n)))
    assert torch.equal(second, both[:, tps:])
    steps = len(token_layout(CFG, 1)) - 1  # one new segment: its ids after SOI, less the EOS
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    for started in (1, CFG.n_i, tps - 1):  # a segment already begun (sample.py: the frames a window's prefix fixes)
        rest = generate(m, text, frames, motion, prefix_codes=both[:, :tps + started], temperature=0.0)
        assert torch.equal(rest, both[:, tps + started:])


@pytest.mark.exercise("lm_sequence", points=4)
@pytest.mark.uses("kv_cache", "lm_sampling", "rope")
def test_initial_loss_and_overfit():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    m = SemanticLM(cfg)
    B = 8
    codes = torch.randint(cfg.codebook_size, (B, cfg.tokens_per_segment))
    text, frames, motion = torch.randn(B, cfg.text_len, cfg.text_dim), torch.full((B,), 5), torch.rand(B) + 0.5
    loss0 = lm_loss(m, codes, text, frames, motion).item()
    assert abs(loss0 - math.log(cfg.vocab_size)) < 0.1, loss0
    # overfit four sequences: the structure tokens alone are cheap, so the loss can only get near zero
    # if the codes are memorised; greedy decoding must then write them back exactly
    m, B = SemanticLM(dataclasses.replace(cfg, p_uncond=0.0)), 4
    codes, text, frames, motion = codes[:B], text[:B], frames[:B], motion[:B]
    opt = torch.optim.AdamW(m.parameters(), lr=4e-3, weight_decay=0.0)
    for _ in range(70):
        loss = lm_loss(m, codes, text, frames, motion)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"tiny LM overfit: loss {loss0:.3f} -> {loss.item():.4f}")
    assert loss.item() < 0.05
    m.eval()
    assert torch.equal(generate(m, text, frames, motion, temperature=0.0), codes)


@torch.no_grad()
@pytest.mark.exercise("attention", points=2)
@pytest.mark.uses("rope")
def test_manual_attention_equals_sdpa():
    m = _model()
    manual = SemanticLM(dataclasses.replace(CFG, attn_impl="manual")).eval()
    manual.load_state_dict(m.state_dict())
    x = _stream(m)
    assert (m(x) - manual(x)).abs().max() < 1e-4
    words = TextEncoder.build_vocab(CAPTIONS)
    enc, enc_m = TextEncoder(CFG, words), TextEncoder(dataclasses.replace(CFG, attn_impl="manual"), words)
    enc_m.load_state_dict(enc.state_dict())
    ids = enc.tokenize(["a red circle", "cyan square moving left now"])
    assert (enc(ids) - enc_m(ids)).abs().max() < 1e-5


@pytest.mark.uses("rope")
def test_micro_conditions_zero_init_and_scaling():
    torch.manual_seed(0)
    m = SemanticLM(CFG).eval()
    text = _inputs()[0]
    with torch.no_grad():  # zero-initialised last layers: at init the micro-conditions change nothing
        a, b = (m(m.prefix(text, f, s)) for f, s in ((torch.tensor([3, 3]), 0.5), (torch.tensor([9, 9]), 1.25)))
    assert torch.equal(a, b)
    assert all(mlp[2].weight.abs().sum() == 0 for mlp in m.micro.values())
    m = _model()  # once trained (here: random last layers) the extreme toy values are far apart
    e = m.micro_embed(torch.tensor([5, 13, 5, 5]), torch.tensor([1.0, 1.0, 0.5, 1.25]))  # (4, 2, W)
    for i, j, k in ((0, 1, 0), (2, 3, 1)):  # frames 5 vs 13, motion 0.5 vs 1.25
        assert torch.nn.functional.cosine_similarity(e[i, k], e[j, k], dim=0) < 0.9


@pytest.mark.uses("rope")
def test_text_encoder_vocabulary_round_trip():
    words = TextEncoder.build_vocab(CAPTIONS)
    assert words == sorted(set(words)) and "square" in words and "," not in words and "Moving" not in words
    torch.manual_seed(0)
    enc = TextEncoder(CFG, words).eval()
    prompts = ["A red circle, moving LEFT!", "purple square moving up"]
    ids = enc.tokenize(prompts)
    assert ids.shape == (2, CFG.text_len)
    assert ids[1, 0] == TextEncoder.UNK and ids[0, 5] == TextEncoder.PAD and ids[1, 4] == TextEncoder.PAD
    buf = io.BytesIO()
    torch.save(enc.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    again = TextEncoder(CFG, sd["_extra_state"]).eval()
    again.load_state_dict(sd)
    assert again.words == words and torch.equal(again.tokenize(prompts), ids)
    with torch.no_grad():
        out = enc(ids)
        assert torch.equal(again(ids), out)
    assert out.shape == (2, CFG.text_len, CFG.text_dim)
    assert out[ids == TextEncoder.PAD].abs().max() == 0
    assert out[ids != TextEncoder.PAD].norm(dim=-1).min() > 1.0
    with pytest.raises(ValueError, match="never saw hexagon, purple; the words it knows: a blue circle"):
        enc.tokenize(["a red circle", "a purple hexagon"], strict=True)  # strict: unknown words are an error, not UNK
    assert torch.equal(enc.tokenize(prompts[:1], strict=True), ids[:1])
    with pytest.raises(ValueError, match="words"):  # a vocabulary that does not fit the weights
        TextEncoder(CFG, words[:-1]).load_state_dict(sd)


@pytest.mark.uses("lm_sequence")
def test_bad_input():
    m, enc = _model(), TextEncoder(CFG, TextEncoder.build_vocab(CAPTIONS))
    text, frames, motion = _inputs()
    codes = torch.zeros(2, CFG.tokens_per_segment, dtype=torch.long)
    for prompt in ("", " ,. "):
        with pytest.raises(ValueError, match="1 to 6 words"):
            enc.tokenize([prompt])
    with pytest.raises(ValueError, match="1 to 6 words.*not truncated"):
        enc.tokenize(["a red circle moving left very fast"])
    bad = [(dict(frames=torch.tensor([0, 3])), r"frames must lie in \[1, 32\]"),
           (dict(frames=torch.tensor([3, 40])), r"frames must lie in \[1, 32\]"),
           (dict(motion=torch.tensor([1.0, 2.5])), r"motion must lie in \[0.0, 2.0\]"),
           (dict(motion=-0.1), r"motion must lie in \[0.0, 2.0\]"),
           (dict(motion=torch.ones(3)), r"motion must be a number or a \(2,\) tensor"),
           (dict(text=torch.randn(2, 7, 32)), "1 <= L <= text_len = 6"),
           (dict(text=torch.randn(2, 6, 31)), r"text must be \(B, L, 32\)")]
    for kw, msg in bad:
        args = dict(text=text, frames=frames, motion=motion) | kw
        for call in (lambda: generate(m, **args), lambda: lm_loss(m, codes, **args)):
            with pytest.raises(ValueError, match=msg):
                call()
    for c, msg in ((codes[:, :-1], "tokens_per_segment = 10, got"), (codes + 50, r"codebook ids in \[0, 50\)")):
        with pytest.raises(ValueError, match=msg):
            lm_loss(m, c, text, frames, motion)
    for c, msg in ((codes[:, :0], "tokens_per_segment = 10, got"), (codes + 50, r"codebook ids in \[0, 50\)")):
        with pytest.raises(ValueError, match=msg):
            generate(m, text, frames, motion, prefix_codes=c)
    for kw, msg in ((dict(n_segments=0), "n_segments"), (dict(temperature=-1.0), "temperature"),
                    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=msg):
            generate(m, text, frames, motion, **kw)
    for kw, msg in ((dict(attn_impl="flash"), "attn_impl"), (dict(heads=3), "heads"), (dict(p_uncond=1.0), "p_uncond"),
                    (dict(gelu="exact"), "gelu 'none' or 'tanh'"),
                    (dict(code_levels=(8, 5, 5)), "must multiply to codebook_size 1000"),
                    (dict(null_motion=2.5), r"null_motion must be None or in \[0, motion_max = 2.0\]")):
        with pytest.raises(ValueError, match=msg):
            LMConfig(**kw)
    with pytest.raises(KeyError):
        PRESETS["huge"]


@pytest.mark.uses("fsq")
def test_code_digits_read_the_tokenizers_grid():
    """code_digits must describe the tokenizer's FSQ ids: one one-hot per level, and value columns that are
    the quantized channels (tokenizer.FSQ.indices_to_codes) up to one affine map each; structure ids get none."""
    from tokenizer import FSQ
    from tokenizer import PRESETS as TOKENIZER_PRESETS
    cfg = PRESETS["tiny"]
    assert cfg.code_levels == TOKENIZER_PRESETS["tiny"].levels
    table = code_digits(cfg)  # (V, sum(levels) + len(levels))
    n_levels = len(cfg.code_levels)
    assert table.shape == (cfg.vocab_size, sum(cfg.code_levels) + n_levels)
    assert torch.equal(table[:cfg.codebook_size, :-n_levels].sum(1), torch.full((cfg.codebook_size,), float(n_levels)))
    assert not table[cfg.codebook_size:].any()
    channels = FSQ(cfg.code_levels).indices_to_codes(torch.arange(cfg.codebook_size))  # (codebook, D)
    lo, hi = channels.amin(0), channels.amax(0)
    torch.testing.assert_close((table[:cfg.codebook_size, -n_levels:] + 1) / 2, (channels - lo) / (hi - lo))
    m = _model()
    ids = torch.tensor([0, 7, CFG.codebook_size + 1])  # two codes and BOS: BOS has no digits
    assert not torch.allclose(m.embed_ids(ids[:2]), m.embed(ids[:2]))
    assert torch.equal(m.embed_ids(ids[2:]), m.embed(ids[2:]))


def test_presets():
    tiny, full = PRESETS["tiny"], PRESETS["full"]
    assert LMConfig() == tiny and tiny.vocab_size == 1007 and tiny.tokens_per_segment == 8 + 4 * 4
    assert (full.vocab_size, full.tokens_per_segment, full.width, full.depth, full.heads, full.mlp) == \
        (2055, 1218, 2048, 24, 16, 11008)
    assert [getattr(full, s) for s in SPECIALS] == list(range(2048, 2055))
    assert full.gelu == "tanh"  # the release's form, which its weights were trained with (tiny: the exact one)
    with torch.device("meta"):
        n = sum(p.numel() for p in SemanticLM(full).parameters())
    assert abs(n / 2_049_321_984 - 1) < 0.01, n
