"""bench.py: minimal LanDiff side by side with the implementations people already use.

For every stage, ours and its established peer are built at the same configuration in one
process, the weights are copied one to one, the two are checked to compute the same thing, and
both are timed: fp32, a fixed number of threads, one warm-up call each, then K repeats
interleaved (ours, peer, ours, peer, ...) so that a busy machine slows both alike; the table
shows medians per call. A fast call is looped within a repeat until the repeat lasts >= 0.2 s.

    row         ours                          peer                                      parity
    fsq         tokenizer.FSQ                 vector_quantize_pytorch.FSQ               codes and indices identical
    lm          lm.generate, temperature 0    transformers LlamaForCausalLM.generate    logits <= 1e-4, same tokens
    dit         diffusion.DiT forward         diffusers CogVideoXTransformer3DModel     output <= 1e-4
    vae         vae.VAE encode + decode       diffusers AutoencoderKLCogVideoX          latents and frames <= 1e-4
    sample      sample.generate_video         -  (one 17-frame tiny clip, wall time)
    train_tiny  python train_tiny.py          -  (out/tiny/report.json; `python tools/bench.py --only train_tiny` runs it, 16-17 min)

How parity is matched, row by row:
- fsq: nothing to map (both are the paper's FSQ with the peer's default options); bit for bit.
- lm: our fused qkv and w13 split into q/k/v_proj and gate/up_proj; the q and k rows are permuted
  per head (we rotate adjacent channel pairs (2i, 2i+1), Llama rotates halves (i, i + D/2), with the
  same frequency for pair i); the peer's final RMSNorm is replaced by a copy of our final LayerNorm
  (our one deviation); both start from the same prefix embeddings (the peer's inputs_embeds), as
  the prefix MLPs are ours alone. Our 2-D weights are scaled x1.5 so that greedy decoding is
  decisive. Ours is timed as lm.generate itself (temperature 0): prefill, then 255 cached steps for
  255 codes + the forced [EOI] = 256 ids; the peer as generate() with its KV cache and
  min_new_tokens = max_new_tokens = 256: the same prefill + 255 cached steps. For the token check
  the peer is barred from the 7 structure ids (suppress_tokens), as generate is.
- dit: a key map (the peer's patch conv (D, C, p, p) is our linear (D, C*p*p)). The peer takes
  (B, T, C, H, W) latents and 1000*t, ours (B, C, T, H, W) and t: inputs are made outside the timer.
- vae: a key map; the peer's GroupNorms (those module instances only) are patched to take their
  statistics per frame, our one deliberate deviation (vae.py's docstring). The table times the
  patched peer (the same arithmetic); a note gives the time of the unpatched peer as well.

ratio = peer time / our time: > 1 means we are faster. Parity is the largest absolute difference
of the outputs; a row whose parity exceeds 1e-4 (or whose tokens/codes differ) says FAIL and the
exit status is 1. A missing peer package skips the comparison (one line), never the row.

    pip install -r tools/requirements-bench.txt          # the peers, pinned; torch comes from requirements.txt
    python tools/bench.py                                # every row (train_tiny read from its report)
    python tools/bench.py --only lm --threads 2 --repeats 5
    python tools/bench.py --only fsq,dit --quick         # small sizes, seconds: does the bench itself work?
"""
import argparse
import copy
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python tools/bench.py`: import the stages

import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

import diffusion
import lm
import sample
import tokenizer
import vae

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the stage files live there
ROWS = ("fsq", "lm", "dit", "vae", "sample", "train_tiny")
PEERS = ("transformers", "diffusers", "vector-quantize-pytorch", "accelerate")  # requirements-bench.txt
SKIP = "skipped: pip install -r tools/requirements-bench.txt"
TOL = 1e-4

# The CPU-sized configurations, and --quick ones (seconds: a smoke test of the bench itself).
SIZES = {
    "issue": dict(fsq=(64, 1024), lm=dict(width=1024, depth=8, heads=16, mlp=2816, prompt=32, new=256),
                  dit=dict(width=512, depth=8, heads=8, mlp=2048, text_dim=256, text_len=64, time_dim=512,
                           batch=2, frames=5, lat=16),
                  vae=dict(base_ch=32, n_res=2, z_ch=16, groups=8, clip=(1, 3, 9, 64, 64)), steps=25),
    "quick": dict(fsq=(4, 256), lm=dict(width=128, depth=2, heads=4, mlp=352, prompt=8, new=16),
                  dit=dict(width=64, depth=2, heads=2, mlp=256, text_dim=32, text_len=8, time_dim=64,
                           batch=1, frames=5, lat=8),
                  vae=dict(base_ch=8, n_res=1, z_ch=4, groups=4, clip=(1, 3, 9, 16, 16)), steps=2),
}


@dataclass
class Row:
    """One line of the table: median seconds per call, the parity cell, notes printed below."""
    stage: str
    ours: float = None
    peer: float = None
    parity: str = "-"
    ok: bool = True  # False: parity out of tolerance, or the row failed
    per: str = ""  # ours and peer as a rate, e.g. "tok/s"
    count: int = 0  # items per call for that rate
    notes: list = field(default_factory=list)


def optional(module):
    """Import an optional peer package, or None when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def timed(fns, repeats, min_time=0.2):
    """fns {name: f()} -> {name: median seconds per call}. One warm-up call each (it also sets how
    often a fast call is looped per repeat), then `repeats` rounds, interleaved."""
    loops, samples = {}, {k: [] for k in fns}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        loops[k] = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                f()
            samples[k].append((time.perf_counter() - t0) / loops[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def diff_cell(row, diff, extra=""):
    """Fill the parity cell with a max abs diff; FAIL (and row.ok False) above TOL."""
    row.ok = row.ok and diff <= TOL
    row.parity = f"{diff:.1e}{extra}" + ("" if diff <= TOL else f" FAIL (> {TOL:g})")


# ---------------------------------------------------------------------------- fsq


@torch.no_grad()
def bench_fsq(a, size):
    vq, rows = optional("vector_quantize_pytorch"), []
    for levels in ((8, 5, 5, 5), (8, 8, 8, 4)):
        row = Row(f"fsq {tup(levels)} on {tup((*size, len(levels)))}")
        ours = tokenizer.FSQ(levels)
        z = 2 * torch.randn(*size, len(levels))  # (B, N, D); x2: every level is hit, ties included
        fns = {"ours": lambda: ours(z)}
        if vq is None:
            row.notes.append(SKIP)
        else:
            peer = vq.FSQ(list(levels))
            (c1, i1), (c2, i2) = ours(z), peer(z)
            same = torch.equal(c1, c2) and torch.equal(i1, i2.long())  # the peer's indices are int32
            diff_cell(row, (c1 - c2).abs().max().item(), ", codes+ids ==" if same else ", ids DIFFER FAIL")
            row.ok = row.ok and same
            fns["peer"] = lambda: peer(z)
        t = timed(fns, a.repeats)
        row.ours, row.peer = t["ours"], t.get("peer")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- lm


def llama_from(model):
    """A transformers LlamaForCausalLM that computes what our SemanticLM computes after its prefix."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c, W, M = model.cfg, model.cfg.width, model.cfg.mlp
    peer = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=W, intermediate_size=M, num_hidden_layers=c.depth,
        num_attention_heads=c.heads, num_key_value_heads=c.heads, hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=c.norm_eps, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    D = W // c.heads
    half = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])  # (D,): Llama row j is our row half[j]
    perm = (torch.arange(c.heads)[:, None] * D + half).flatten()  # (W,): the same within every head
    sd = {"model.embed_tokens.weight": model.embed.weight, "lm_head.weight": model.head.weight}
    for i, b in enumerate(model.blocks):
        q, k, v = b.qkv.weight.split(W)  # (W, W) each
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": b.norm1.weight, p + "post_attention_layernorm.weight": b.norm2.weight,
               p + "self_attn.q_proj.weight": q[perm], p + "self_attn.k_proj.weight": k[perm],
               p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": b.proj.weight,
               p + "mlp.gate_proj.weight": b.w13.weight[:M], p + "mlp.up_proj.weight": b.w13.weight[M:],
               p + "mlp.down_proj.weight": b.w2.weight}
    own = peer.state_dict()
    for k, t in sd.items():
        assert own[k].shape == t.shape, (k, tuple(own[k].shape), tuple(t.shape))
    left = {k for k in own if k not in sd and k != "model.norm.weight" and "rotary_emb" not in k}
    assert not left, f"peer weights with no counterpart: {sorted(left)}"
    peer.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=False)
    peer.model.norm = copy.deepcopy(model.norm)  # our final LayerNorm in place of its RMSNorm
    return peer


@torch.no_grad()
def bench_lm(a, s):
    n = s["new"]  # ids per generate: n - 1 codes, then the forced [EOI]
    cfg = lm.LMConfig(codebook_size=2048, n_i=n - 1, n_p=1, frames=1, width=s["width"], depth=s["depth"],
                      heads=s["heads"], mlp=s["mlp"], text_len=s["prompt"] - 4, code_levels=(), gelu="tanh")  # prefix = text_len + 4; Llama's table
    row = Row(f"lm decode {n} tok", per="tok/s", count=n)
    model = lm.SemanticLM(cfg).eval()
    for p in model.parameters():  # x1.5: an N(0, 0.02) net's top logits are near ties; make greedy decisive
        if p.dim() == 2:  # (more sharpens attention and grows the float error: x2.5 gave 6e-5, x1.5 1e-5)
            p.mul_(1.5)
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    prefix = model.prefix(text, 1, 1.0)  # (1, prompt, W): [BOS][frames][motion][text][SOI]
    fns = {"ours": lambda: lm.generate(model, text, 1, 1.0, temperature=0.0)}
    row.notes.append(f"ours = lm.generate(temperature=0) itself; width {cfg.width}, {cfg.depth} layers, {cfg.heads} "
                     f"heads, MLP {cfg.mlp}, vocab {cfg.vocab_size}, prompt {prefix.shape[1]}, batch 1")
    transformers = optional("transformers")
    if transformers is None:
        row.notes.append(SKIP)
    else:
        transformers.logging.set_verbosity_error()
        peer = llama_from(model)
        row.notes.append("peer: q/k rows permuted per head (RoPE pairs vs halves), its final RMSNorm swapped for our "
                         "LayerNorm, fed our prefix embeddings as inputs_embeds")
        codes = fns["ours"]()  # (1, n - 1)
        x = torch.cat([prefix, model.embed_ids(codes)], dim=1)  # (1, prompt + n - 1, W)
        diff = (model(x) - peer(inputs_embeds=x).logits).abs().max().item()
        mask = torch.ones(1, prefix.shape[1], dtype=torch.long)
        kw = dict(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        theirs = peer.generate(**kw, suppress_tokens=list(range(cfg.codebook_size, cfg.vocab_size)))[:, -n:]
        same = int((theirs[:, : n - 1] == codes).sum())
        diff_cell(row, diff, f", {same}/{n - 1} tokens ==")
        row.ok = row.ok and same == n - 1
        fns["peer"] = lambda: peer.generate(**kw)
    t = timed(fns, a.repeats)
    row.ours, row.peer = t["ours"], t.get("peer")
    return [row]


# ---------------------------------------------------------------------------- dit


def dit_key_map(cfg):
    """{our key: diffusers key} for every DiT parameter."""
    m = {"embed.patch": "patch_embed.proj", "embed.text": "patch_embed.text_proj",
         "embed.time1": "time_embedding.linear_1", "embed.time2": "time_embedding.linear_2",
         "norm_final": "norm_final", "norm_out": "norm_out.norm", "ada_out": "norm_out.linear", "proj_out": "proj_out"}
    block = {"norm1": "norm1.norm", "ada1": "norm1.linear", "q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v",
             "out": "attn1.to_out.0", "q_norm": "attn1.norm_q", "k_norm": "attn1.norm_k", "norm2": "norm2.norm",
             "ada2": "norm2.linear", "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}
    for i in range(cfg.depth):
        m |= {f"blocks.{i}.{a}": f"transformer_blocks.{i}.{b}" for a, b in block.items()}
    return {f"{a}.{s}": f"{b}.{s}" for a, b in m.items() for s in ("weight", "bias")}


@torch.no_grad()
def bench_dit(a, s):
    cfg = replace(diffusion.PRESETS["tiny"], latent_ch=16, frames=s["frames"], lat_h=s["lat"], lat_w=s["lat"], patch=2,
                  width=s["width"], depth=s["depth"], heads=s["heads"], mlp=s["mlp"], text_dim=s["text_dim"],
                  text_len=s["text_len"], time_dim=s["time_dim"], gelu="tanh")  # CogVideoX's GELU form
    B = s["batch"]
    row = Row("dit forward")
    x = torch.randn(B, cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w)  # (B, C, T, H, W)
    t, text = torch.rand(B), torch.randn(B, cfg.text_len, cfg.text_dim)
    row.notes.append(f"{cfg.depth} layers, {cfg.heads}x{cfg.width // cfg.heads} heads, text {cfg.text_len}x"
                     f"{cfg.text_dim}, latents {tuple(x.shape)}, patch 2")
    ours = diffusion.DiT(cfg).eval()
    fns = {"ours": lambda: ours(x, t, text)}
    diffusers = optional("diffusers")
    if diffusers is None:
        row.notes.append(SKIP)
    else:
        peer = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads, in_channels=cfg.latent_ch,
            out_channels=cfg.latent_ch, time_embed_dim=cfg.time_dim, text_embed_dim=cfg.text_dim, num_layers=cfg.depth,
            sample_width=cfg.lat_w, sample_height=cfg.lat_h, sample_frames=(cfg.frames - 1) * 4 + 1,
            patch_size=cfg.patch, max_text_seq_length=cfg.text_len).eval()
        for p in peer.parameters():  # its init has no zeros; noise on every tensor so that norms and biases count
            p.add_(0.05 * torch.randn_like(p))
        theirs, sd = peer.state_dict(), {}
        for k, pk in dit_key_map(cfg).items():
            sd[k] = theirs[pk].flatten(1) if k == "embed.patch.weight" else theirs[pk]  # (D, C, p, p) -> (D, C*p*p)
        ours.load_state_dict(sd, strict=True)
        xp = x.permute(0, 2, 1, 3, 4).contiguous()  # (B, T, C, H, W): the peer's layout
        fns["peer"] = lambda: peer(xp, text, 1000 * t, return_dict=False)[0]
        diff_cell(row, (fns["ours"]() - fns["peer"]().permute(0, 2, 1, 3, 4)).abs().max().item())
    tm = timed(fns, a.repeats)
    row.ours, row.peer = tm["ours"], tm.get("peer")
    return [row]


# ---------------------------------------------------------------------------- vae


VAE_RULES = [  # our state_dict key -> diffusers', applied in order
    (r"^(encoder|decoder)\.blocks\.(\d+)\.(\d+)\.", r"\1.BLK.\2.resnets.\3."),
    (r"^(encoder|decoder)\.mid\.(\d+)\.", r"\1.mid_block.resnets.\2."),
    (r"^encoder\.downs\.(\d+)\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^decoder\.ups\.(\d+)\.", r"decoder.up_blocks.\1.upsamplers.0.conv."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.(conv_in|conv_out|conv1|conv2|conv_y|conv_b)\.(weight|bias)$", r".\1.conv.\2"),
    (r"\.norm\.(weight|bias)$", r".norm_layer.\1"),
    (r"^encoder\.BLK\.", "encoder.down_blocks."),
    (r"^decoder\.BLK\.", "decoder.up_blocks."),
]


def vae_peer_key(k):
    for pattern, repl in VAE_RULES:
        k = re.sub(pattern, repl, k)
    return k


def frame_group_norm(self, x):
    """Bound to the peer's nn.GroupNorm instances: statistics per frame, as vae.FrameGroupNorm."""
    if x.dim() != 5:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    B, C, T, H, W = x.shape
    y = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), self.num_groups, self.weight, self.bias, self.eps)
    return y.view(B, T, C, H, W).transpose(1, 2)  # (B*T, C, H, W) -> (B, C, T, H, W)


@torch.no_grad()
def bench_vae(a, s):
    cfg = vae.VAEConfig(base_ch=s["base_ch"], ch_mult=(1, 2, 2, 4), n_res=s["n_res"], z_ch=s["z_ch"],
                        groups=s["groups"], eps=1e-6, time_levels=2)  # 8x space, 4x time; the release eps
    row = Row("vae encode+decode")
    row.notes.append(f"widths {tuple(cfg.base_ch * m for m in cfg.ch_mult)}, ResBlocks per level {cfg.n_res}, "
                     f"z {cfg.z_ch}, clip {s['clip']}")
    ours = vae.VAE(cfg).eval()
    x = torch.rand(*s["clip"]) * 2 - 1

    def ours_fn():
        mean, logvar = ours.encode(x)
        return mean, logvar, ours.decode(mean)

    fns = {"ours": ours_fn}
    diffusers = optional("diffusers")
    if diffusers is None:
        row.notes.append(SKIP)
    else:
        peer = diffusers.AutoencoderKLCogVideoX(block_out_channels=tuple(cfg.base_ch * m for m in cfg.ch_mult),
                                                layers_per_block=cfg.n_res, latent_channels=cfg.z_ch,
                                                norm_num_groups=cfg.groups).eval()
        for n, p in peer.named_parameters():  # random norm affines too, so the key map is really tested
            if "norm" in n and "conv" not in n:
                p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("weight") else 0.2 * torch.randn_like(p))
        sd, psd = ours.state_dict(), peer.state_dict()
        mapped = {vae_peer_key(k): k for k in sd}
        assert set(mapped) == set(psd), f"unmatched keys: {sorted(set(mapped) ^ set(psd))[:6]}"
        ours.load_state_dict({k: psd[pk] for pk, k in mapped.items()})
        norms = [m for m in peer.modules() if type(m) is nn.GroupNorm]

        def peer_fn():
            dist = peer.encode(x).latent_dist
            return dist.mean, dist.logvar, peer.decode(dist.mean).sample

        def native_fn():  # the peer as shipped: GroupNorm statistics over all frames of a chunk
            for m in norms:
                del m.forward
            try:
                return peer_fn()
            finally:
                for m in norms:
                    m.forward = types.MethodType(frame_group_norm, m)

        for m in norms:
            m.forward = types.MethodType(frame_group_norm, m)
        row.notes.append(f"peer: its {len(norms)} GroupNorms patched to per-frame statistics (our one deviation, "
                         "vae.py); the peer encodes/decodes this clip in one frame batch, ours whole")
        diff_cell(row, max((u - v).abs().max().item() for u, v in zip(ours_fn(), peer_fn())))
        fns |= {"peer": peer_fn, "native": native_fn}
    t = timed(fns, a.repeats)
    row.ours, row.peer = t["ours"], t.get("peer")
    if "native" in t:
        row.notes.append(f"unpatched peer (GroupNorm over whole chunks, not our arithmetic): {fmt(t['native'])}, "
                         f"ratio {t['native'] / t['ours']:.2f}")
    return [row]


# ---------------------------------------------------------------------------- sample, train_tiny (no peer)


def bench_sample(a, steps):
    row = Row("sample 17-frame clip")
    ckpt = ROOT / "out" / "tiny"
    p = None
    if all((ckpt / f"{s}.pt").exists() for s in sample.STAGES):
        try:
            p, src = sample.load_pipeline(str(ckpt)), f"trained checkpoints in {ckpt}"
        except SystemExit as e:  # a corrupt or foreign checkpoint: say so, time random weights
            row.notes.append(str(e))
    if p is None:
        p, src = sample.random_pipeline("tiny"), "random weights (sample.random_pipeline('tiny')): no usable out/tiny"
        for m in p.modules():
            m.eval().requires_grad_(False)
    row.notes.append(f"sample.generate_video, one prompt, {steps} Euler steps, default guidance (LM 3, DiT 2); {src}")
    row.ours = timed({"ours": lambda: sample.generate_video(p, ["a red circle moving left"], 17, steps=steps)},
                     a.repeats)["ours"]
    return [row]


def bench_train_tiny(a, run, root=ROOT):
    """run: time `python train_tiny.py` in a subprocess (16-17 min); else read the report of the last run."""
    row, report = Row("train_tiny"), root / "out" / "tiny" / "report.json"
    if run:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "train_tiny.py"], cwd=root, env=env).returncode
        row.ours = time.perf_counter() - t0
        row.notes.append(f"`python train_tiny.py` run now, OMP_NUM_THREADS={a.threads}: wall time")
        if rc:
            row.ok, row.parity = False, f"FAIL: exit status {rc}"
            return [row]
    if not report.exists():
        row.notes.append(f"no {report.relative_to(root)}: `python tools/bench.py --only train_tiny` runs it (16-17 min)")
        return [row]
    rep = json.loads(report.read_text())
    stages = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in rep.items() if isinstance(v, dict) and "seconds" in v)
    when = datetime.datetime.fromtimestamp(report.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    if not run:
        row.ours = rep.get("total_seconds")
        row.notes.append(f"from {report.relative_to(root)} written {when} (not re-run; `python tools/bench.py --only train_tiny` runs it)")
    row.notes.append(f"per stage: {stages}; total in the report {rep.get('total_seconds', '?')} s")
    return [row]


# ---------------------------------------------------------------------------- the table


def tup(t):
    return "(" + ",".join(map(str, t)) + ")"


def fmt(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def machine(threads, repeats):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    peers = []
    for name in PEERS:
        try:
            peers.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            peers.append(f"{name} missing")
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, fp32, {threads} thread(s), "
            f"median of {repeats} interleaved repeats; {cpu}, {os.cpu_count()} cores, {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}\npeers: {', '.join(peers)}")


def table(rows):
    head = ("stage", "ours", "peer", "ratio", "parity (max abs diff)")
    cells = [head]
    for r in rows:
        ours, peer = fmt(r.ours), fmt(r.peer)
        if r.count and r.ours:
            ours += f" ({r.count / r.ours:.1f} {r.per})"
        if r.count and r.peer:
            peer += f" ({r.count / r.peer:.1f} {r.per})"
        ratio = f"{r.peer / r.ours:.2f}" if r.ours and r.peer else "-"
        cells.append((r.stage, ours, peer, ratio, r.parity))
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = [" | ".join(c.ljust(n) for c, n in zip(row, w)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * n for n in w))
    return "\n".join(lines)


def parse_only(values):
    chosen = [v.strip() for arg in values or [] for v in arg.split(",") if v.strip()]
    bad = [v for v in chosen if v not in ROWS]
    if bad:
        raise SystemExit(f"error: --only takes {', '.join(ROWS)} (repeatable or comma-separated), got {', '.join(bad)}")
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="ratio = peer time / our time (> 1: we are "
                                 "faster)", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="ROW", help=f"rows to run: {', '.join(ROWS)} (repeatable or "
                    "comma-separated; default all, train_tiny read from out/tiny/report.json unless named here)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row, median reported (default 5)")
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds per row: checks the bench, not speed")
    a = ap.parse_args(argv)
    only = parse_only(a.only)
    if a.threads < 1 or a.repeats < 1:
        raise SystemExit(f"error: --threads and --repeats must be >= 1, got {a.threads}, {a.repeats}")
    torch.set_num_threads(a.threads)
    s = SIZES["quick" if a.quick else "issue"]
    runs = {"fsq": lambda: bench_fsq(a, s["fsq"]), "lm": lambda: bench_lm(a, s["lm"]),
            "dit": lambda: bench_dit(a, s["dit"]), "vae": lambda: bench_vae(a, s["vae"]),
            "sample": lambda: bench_sample(a, s["steps"]),
            "train_tiny": lambda: bench_train_tiny(a, run="train_tiny" in only)}
    rows = []
    for key in only or ROWS:
        print(f"[{key}] ...", flush=True)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        try:
            new = runs[key]()
        except Exception as e:  # one broken row (a peer's API changed, ...) must not hide the others
            traceback.print_exc()
            new = [Row(key, parity="FAIL: error", ok=False, notes=[f"{type(e).__name__}: {e}"])]
        rows += new
        print(f"[{key}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    print("\n" + machine(a.threads, a.repeats) + ("\n--quick: small sizes, not the issue's" if a.quick else ""))
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"  {r.stage}: {note}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r.ok for r in main()) else 1)
