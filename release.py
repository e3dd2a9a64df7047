"""release.py: the released LanDiff weights in our modules (nanoGPT's from_pretrained, for five files).

    python release.py --expected-keys > expected.json   # every tensor the loader expects, per file
    python release.py --check DIR                       # a download's keys and shapes; no model is built
    python sample.py --weights DIR --prompt "..." --out clip.mp4

The release (huggingface.co/yinaoxiong/LanDiff, fetched by hand) is one folder, FILES below, plus the
two T5 encoders in Hugging Face format: CogVideoX-2b-sat/t5-v1_1-xxl/ (the DiT's, in the release) and
flan-t5-xxl/ (the LM's, google/flan-t5-xxl, not in the release: put it there). A missing T5 folder
falls back to StandInText, seeded random features of T5's shape, and says so loudly.

One key map per stage: {our tensor name: Link}, a Link naming the release tensors it is made of, their
shapes, and how they join (one tensor as is or reshaped; rows stacked; chunks of rows picked; two
linear maps multiplied out). Every shape comes from our module built on the meta device, so the map
is also the list of what the release must hold (--expected-keys). Loading is strict: every tensor
our module has is filled, every tensor of the file is used or listed by unused() (known, ignored, with
the reason) or in TOLERATED (may be present, ignored); anything else is one line of error naming the
file and the first missing, mis-shaped or unexpected tensor.

What differs from the release's modules, and how the map absorbs it (docs/DESIGN.md §0):
- tokenizer: our fused qkv = cat(wq, wk, wv); the encoder's Linear(768, 768) + the VQ's Linear(768, 16)
  are one Linear(768, 16), the VQ's Linear(16, 768) + the decoder's Linear(768, 768) one Linear(16, 768);
  the patch conv (768, 768, 1, 1) is our linear; the VQ's EMA statistics and the unused feature
  mean/std are ignored (the release sets no mean_std_path, so it never applies them).
- LM: our w13 = cat(w1, w3); raw micro-condition values (micro_raw).
- DiT and ControlNet (SAT names): query_key_value splits into q, k, v; each adaLN linear's 12 chunks
  split into our two adaLN linears (chunks 0-2 + 6-8, 3-5 + 9-11); the patch conv is our linear; the
  network predicts DDPM's v and is fed its integer step (prediction="v", VPrediction).
- VAE: SAT names, the decoder's levels in reverse order.
"""
import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass

import torch

import diffusion
import lm
import tokenizer
import vae

FILES = {  # stage -> (file inside the release folder, where its tensors sit)
    "tokenizer": ("tokenizer/model.safetensors", None),
    "lm": ("llm/model.safetensors", None),
    "control": ("diffusion/1/mp_rank_00_model_states.pt", "module"),  # SAT/DeepSpeed: torch.load(...)["module"]
    "dit": ("CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt", "module"),
    "vae": ("CogVideoX-2b-sat/vae/3d-vae.pt", "state_dict"),
}
T5_DIT = "CogVideoX-2b-sat/t5-v1_1-xxl"  # the DiT's text encoder, in the release
T5_LM = "flan-t5-xxl"  # the LM's (google/flan-t5-xxl), fetched by hand into the release folder
CONFIG_FILE = "minimal-landiff.json"  # optional: config fields per stage, for a smaller folder (the tests' tiny one)
SAMPLER_DEFAULTS = dict(steps=50, guidance_dit=6.0, guidance_lm=7.5, motion_score=0.1, temperature=1.0)  # the release's, for sample.py
CONTROL = "model.control_model.diffusion_model."  # the SAT engine's prefixes of the two diffusion files
DIT = "model.diffusion_model."
# A DeepSpeed model-states pickle holds tensors and plain containers, and a SAT save can add its
# argparse.Namespace of arguments: that one class is allowed on top of torch.load(weights_only=True)'s.
SAT_ALLOWLIST = [argparse.Namespace]


def release_configs(overrides=None):
    """The full presets with the release's switches: VQ tokenizer, raw micro-conditions, a DiT fed DDPM
    steps. overrides {stage: {field: value}} (CONFIG_FILE) change sizes, e.g. for a tiny test folder."""
    overrides = overrides or {}
    cfgs = {"tokenizer": tokenizer.PRESETS["full"], "lm": dataclasses.replace(lm.PRESETS["full"], micro_raw=True),
            "dit": dataclasses.replace(diffusion.PRESETS["full"], prediction="v"), "vae": vae.PRESETS["full"]}
    cfgs = {k: dataclasses.replace(c, **overrides.get(k, {})) for k, c in cfgs.items()}
    return cfgs | {"control": cfgs["dit"]}


BUILD = {"tokenizer": tokenizer.SemanticTokenizer, "lm": lm.SemanticLM, "dit": diffusion.DiT,
         "control": diffusion.ControlNet, "vae": vae.VAE}


# ---------------------------------------------------------------------------- links: our tensors from the release's
@dataclass
class Link:
    names: tuple  # release tensor names
    shapes: tuple  # their shapes
    join: object  # callable: their tensors (float64 when matmul'd, else as stored) -> our tensor


def same(name, shape, stored=None):
    """The release tensor `name`, stored as `stored` when only a reshape tells it from ours (a 1x1 or
    per-frame conv as our linear, a (1, 1, W) token as our (W,))."""
    return Link((name,), (tuple(stored or shape),), lambda t: t[0].reshape(shape))


def stacked(names, shape):
    """Release tensors stacked along rows: our fused matmuls (q/k/v, the gated MLP's w1/w3)."""
    rows = shape[0] // len(names)
    return Link(tuple(names), tuple((rows, *shape[1:]) for _ in names), torch.cat)


def chunks(name, picks, of, shape):
    """Chunks `picks` of the release tensor `name` cut into `of` equal row chunks (SAT's fused tensors)."""
    rows = shape[0] // len(picks)
    return Link((name,), ((rows * of, *shape[1:]),), lambda t: torch.cat([t[0].chunk(of)[k] for k in picks]))


def multiplied(first, second, shape, mid):
    """Two linears in a row, y = W2 (W1 x + b1) + b2, as one: weight W2 W1, bias W2 b1 + b2. first, second:
    the release's name prefixes; shape: our weight's (out, in); mid: the width between them."""
    out, inp = shape
    return {"weight": Link((f"{second}.weight", f"{first}.weight"), ((out, mid), (mid, inp)),
                           lambda t: t[0].double() @ t[1].double()),
            "bias": Link((f"{second}.weight", f"{first}.bias", f"{second}.bias"), ((out, mid), (mid,), (out,)),
                         lambda t: t[0].double() @ t[1].double() + t[2].double())}


def linear(ours, theirs, shapes, stored=None):
    """{ours.weight, ours.bias (if we have one)} <- the release's {theirs.weight, theirs.bias}."""
    links = {f"{ours}.weight": same(f"{theirs}.weight", shapes[f"{ours}.weight"], stored)}
    if f"{ours}.bias" in shapes:
        links[f"{ours}.bias"] = same(f"{theirs}.bias", shapes[f"{ours}.bias"])
    return links


# ---------------------------------------------------------------------------- the key maps, one per stage
def tokenizer_map(model):
    """Our SemanticTokenizer <- tokenizer/model.safetensors (TiTok blocks + vector_quantize_pytorch's VQ)."""
    cfg = model.cfg
    shapes = shapes_of(model)
    pair = functools.partial(linear, shapes=shapes)
    width = cfg.width
    links = {
        "quantizer.codebook": same("quantizer._codebook.embed", (cfg.vq_codes, cfg.vq_dim), (1, cfg.vq_codes, cfg.vq_dim)),
        "encoder.i_queries": same("encoder.IFrame_latent_tokens", (cfg.n_i, width)),
        "encoder.p_queries": same("encoder.PFrame_latent_tokens", (cfg.n_p, width)),
        "decoder.mask_token": same("decoder.mask_token", (width,), (1, 1, width)),
    }
    links |= pair("encoder.patch_embed", "encoder.patch_embed", stored=(width, cfg.feat_dim, 1, 1))  # a 1x1 conv
    for part, depth in (("encoder", cfg.enc_depth), ("decoder", cfg.dec_depth)):
        links |= pair(f"{part}.norm_pre", f"{part}.ln_pre")
        links |= pair(f"{part}.norm_post", f"{part}.ln_post")
        for i in range(depth):
            ours = f"{part}.blocks.{i}"
            theirs = f"{part}.transformer.{i}"
            qkv = [f"{theirs}.attn.{name}.weight" for name in ("wq", "wk", "wv")]
            links[f"{ours}.qkv.weight"] = stacked(qkv, shapes[f"{ours}.qkv.weight"])
            links |= pair(f"{ours}.proj", f"{theirs}.attn.wo")
            links |= pair(f"{ours}.norm1", f"{theirs}.ln_1")
            links |= pair(f"{ours}.norm2", f"{theirs}.ln_2")
            links |= pair(f"{ours}.fc1", f"{theirs}.mlp.c_fc")
            links |= pair(f"{ours}.fc2", f"{theirs}.mlp.c_proj")
    to_code = multiplied("encoder.proj_out", "quantizer.project_in", shapes["encoder.to_code.weight"], width)
    from_code = multiplied("quantizer.project_out", "decoder.decoder_embed", shapes["decoder.from_code.weight"], width)
    links |= {f"encoder.to_code.{k}": link for k, link in to_code.items()}
    links |= {f"decoder.from_code.{k}": link for k, link in from_code.items()}
    links |= pair("decoder.head.0", "decoder.ffn.0")
    links |= pair("decoder.head.2", "decoder.ffn.2")
    return links


def lm_map(model):
    """Our SemanticLM <- llm/model.safetensors (Semantic1DLM)."""
    cfg = model.cfg
    shapes = shapes_of(model)
    pair = functools.partial(linear, shapes=shapes)
    links = {"null_text": same("cond_model.null_text_embedding", shapes["null_text"])}
    links |= pair("embed", "visual_embedding_model.tok_emb_code")
    links |= pair("text_proj.0", "cond_model.embeddings.fc0")
    links |= pair("text_proj.2", "cond_model.embeddings.fc1")
    for ours, theirs in (("frames", "frames"), ("motion", "motion_score")):
        links |= pair(f"micro.{ours}.0", f"micro_condition.mlps.{theirs}.0")
        links |= pair(f"micro.{ours}.2", f"micro_condition.mlps.{theirs}.2")
    for i in range(cfg.depth):
        ours = f"blocks.{i}"
        theirs = f"transformer.blocks.{i}"
        links |= pair(f"{ours}.norm1", f"{theirs}.norm0")
        links |= pair(f"{ours}.qkv", f"{theirs}.wqkv")
        links |= pair(f"{ours}.proj", f"{theirs}.wo")
        links |= pair(f"{ours}.norm2", f"{theirs}.norm1")
        gated = [f"{theirs}.mlp.w1.weight", f"{theirs}.mlp.w3.weight"]  # gate, then up: our w13's two halves
        links[f"{ours}.w13.weight"] = stacked(gated, shapes[f"{ours}.w13.weight"])
        links |= pair(f"{ours}.w2", f"{theirs}.mlp.w2")
    links |= pair("norm", "transformer.layer_norm")
    links |= pair("head", "transformer.head")
    return links


def dit_blocks_map(cfg, shapes, src, n_blocks):
    """The part a SAT DiT and its ControlNet copy share: embeddings and transformer layers."""
    pair = functools.partial(linear, shapes=shapes)
    links = pair("embed.patch", f"{src}mixins.patch_embed.proj", stored=(cfg.width, cfg.latent_ch, cfg.patch, cfg.patch))
    links |= pair("embed.text", f"{src}mixins.patch_embed.text_proj")
    links |= pair("embed.time1", f"{src}time_embed.0")
    links |= pair("embed.time2", f"{src}time_embed.2")
    ada = f"{src}mixins.adaln_layer"
    for i in range(n_blocks):
        ours = f"blocks.{i}"
        layer = f"{src}transformer.layers.{i}"
        links |= pair(f"{ours}.norm1", f"{layer}.input_layernorm")
        links |= pair(f"{ours}.q_norm", f"{ada}.query_layernorm_list.{i}")
        links |= pair(f"{ours}.k_norm", f"{ada}.key_layernorm_list.{i}")
        links |= pair(f"{ours}.out", f"{layer}.attention.dense")
        links |= pair(f"{ours}.norm2", f"{layer}.post_attention_layernorm")
        links |= pair(f"{ours}.fc1", f"{layer}.mlp.dense_h_to_4h")
        links |= pair(f"{ours}.fc2", f"{layer}.mlp.dense_4h_to_h")
        for w in ("weight", "bias"):
            qkv = f"{layer}.attention.query_key_value.{w}"  # SAT fuses q, k, v in one linear
            for k, name in enumerate(("q", "k", "v")):
                links[f"{ours}.{name}.{w}"] = chunks(qkv, [k], 3, shapes[f"{ours}.{name}.{w}"])
            # 12 chunks: shift, scale, gate of attention then MLP for the video tokens, then the same for text
            modulation = f"{ada}.adaLN_modulations.{i}.1.{w}"
            links[f"{ours}.ada1.{w}"] = chunks(modulation, [0, 1, 2, 6, 7, 8], 12, shapes[f"{ours}.ada1.{w}"])
            links[f"{ours}.ada2.{w}"] = chunks(modulation, [3, 4, 5, 9, 10, 11], 12, shapes[f"{ours}.ada2.{w}"])
    return links


def dit_map(model):
    """Our DiT <- CogVideoX-2b-sat/transformer/.../mp_rank_00_model_states.pt (SAT names)."""
    shapes = shapes_of(model)
    pair = functools.partial(linear, shapes=shapes)
    links = dit_blocks_map(model.cfg, shapes, DIT, model.cfg.depth)
    links |= pair("norm_final", f"{DIT}transformer.final_layernorm")
    links |= pair("norm_out", f"{DIT}mixins.final_layer.norm_final")
    links |= pair("ada_out", f"{DIT}mixins.final_layer.adaLN_modulation.1")
    links |= pair("proj_out", f"{DIT}mixins.final_layer.linear")
    return links


def control_map(model):
    """Our ControlNet <- diffusion/1/mp_rank_00_model_states.pt: the branch, its zero linears, the semantic
    conditioner (a VQGAN decoder as upsampler, then the zero conv)."""
    cfg = model.cfg
    shapes = shapes_of(model)
    pair = functools.partial(linear, shapes=shapes)
    links = dit_blocks_map(cfg, shapes, CONTROL, cfg.control_depth)
    for i in range(cfg.control_depth):
        links |= pair(f"zero.{i}", f"{CONTROL}mixins.adaln_layer.zero_linears.{i}")
    links |= pair("hint_out", f"{CONTROL}semantic_conditioner.conv_out")
    up = f"{CONTROL}semantic_conditioner.upsample_model."
    names = ["conv_in", "mid.block_1", "mid.block_2"]  # the release's names of our Sequential's layers, in order
    for stage in range(cfg.sem_up):  # its levels count down to 0, the full resolution
        level = cfg.sem_up - stage
        names += [f"up.{level}.block.{j}" for j in range(cfg.up_blocks)] + [None, f"up.{level}.upsample.conv"]
    names += [f"up.0.block.{j}" for j in range(cfg.up_blocks)] + ["norm_out", None, "conv_out"]
    for i, (layer, name) in enumerate(zip(model.upsampler, names, strict=True)):
        if isinstance(layer, diffusion.ResBlock):
            for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                                 ("skip", "nin_shortcut")):
                if f"upsampler.{i}.{ours}.weight" in shapes:  # no skip where the width stays
                    links |= pair(f"upsampler.{i}.{ours}", f"{up}{name}.{theirs}")
        elif name is not None:  # a conv or the GroupNorm; None: PixelShuffle and SiLU hold nothing
            links |= pair(f"upsampler.{i}", f"{up}{name}")
    return links


VAE_RULES = [  # our VAE's names -> SAT's, applied in order (the decoder's level i is SAT's up.{levels-1-i})
    (r"^encoder\.blocks\.(\d+)\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.downs\.(\d+)\.", r"encoder.down.\1.downsample.conv."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.block_2."),
    (r"\.skip\.", ".nin_shortcut."),
    (r"\.(conv_in|conv_out|conv1|conv2|conv_y|conv_b)\.(weight|bias)$", r".\1.conv.\2"),  # CausalConv3d's inner conv
    (r"^decoder(.*)\.norm\.(weight|bias)$", r"decoder\1.norm_layer.\2"),  # SpatialNorm's GroupNorm
]


def vae_map(model):
    """Our VAE <- CogVideoX-2b-sat/vae/3d-vae.pt (SAT names; per-frame GroupNorm is ours, no parameter)."""
    last = len(model.cfg.ch_mult) - 1
    links = {}
    for ours, shape in shapes_of(model).items():
        theirs = re.sub(r"^decoder\.blocks\.(\d+)\.", lambda level: f"decoder.up.{last - int(level[1])}.block.", ours)
        theirs = re.sub(r"^decoder\.ups\.(\d+)\.", lambda level: f"decoder.up.{last - int(level[1])}.upsample.conv.", theirs)
        for pattern, repl in VAE_RULES:
            theirs = re.sub(pattern, repl, theirs)
        links[ours] = same(theirs, shape)
    return links


KEY_MAPS = {"tokenizer": tokenizer_map, "lm": lm_map, "control": control_map, "dit": dit_map, "vae": vae_map}


def unused(stage, cfg):
    """{release tensor: (shape, why we ignore it)}: known to be in the file, read by nothing of ours."""
    if stage == "tokenizer":
        ema = "the VQ's training statistics (EMA, k-means); sampling needs only the codebook"
        return {"mean": ((cfg.feat_dim,), "feature mean: the release sets no mean_std_path, never applies it"),
                "std": ((cfg.feat_dim,), "feature std: the release sets no mean_std_path, never applies it"),
                "quantizer._codebook.initted": ((1,), ema), "quantizer._codebook.cluster_size": ((1, cfg.vq_codes), ema),
                "quantizer._codebook.embed_avg": ((1, cfg.vq_codes, cfg.vq_dim), ema)}
    if stage == "control":
        why = "a LayerNorm the branch holds but its forward never applies (its final layer is empty)"
        return {f"{CONTROL}transformer.final_layernorm.{w}": ((cfg.width,), why) for w in ("weight", "bias")}
    return {}


TOLERATED = {  # stage -> [(name prefix, why)]: tensors a file may or may not hold; ignored when present
    "tokenizer": [], "lm": [],
    "control": [(f"{CONTROL}mixins.pos_embed.pos_embedding", "the fixed 3D sin-cos table; ours is computed"),
                (f"{CONTROL}semantic_conditioner.semantic_model.", "a copy of the frozen tokenizer (tokenizer/ is used)"),
                ("conditioner.", "a copy of T5 (the t5-v1_1-xxl folder is used)"),
                ("first_stage_model.", "a copy of the VAE (vae/3d-vae.pt is used)")],
    "dit": [(f"{DIT}mixins.pos_embed.pos_embedding", "the fixed 3D sin-cos table; ours is computed")],
    "vae": [("loss.", "the VAE's training losses (LPIPS, discriminator)")],
}


# ---------------------------------------------------------------------------- reading and matching files
def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read(path, container, shapes_only=False):
    """-> {name: tensor} (or {name: shape}, reading no data) of a release file; ValueError when unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing file (the release's layout: {', '.join(f for f, _ in FILES.values())})")
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ValueError("reading .safetensors needs the safetensors package: pip install -r "
                             "requirements-release.txt") from None
        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated, or not a safetensors file
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:  # mmap: tensors are read from disk when used, so a shape check reads no data
        with torch.serialization.safe_globals(SAT_ALLOWLIST):
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a file in torch's legacy (pre-zip) format cannot be mapped: read it whole
                if "mmap" not in str(e):
                    raise
                saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it needs {found[1]}, which is not on release.SAT_ALLOWLIST" if found else f"{type(e).__name__}"
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({why})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get(container), dict):
        raise ValueError(f"{path}: expected a dict with the tensors under {container!r}, got "
                         f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}")
    return {k: tuple(v.shape) if shapes_only else v for k, v in saved[container].items()}


def expected(stage, cfg):
    """-> (our module on the meta device, {release tensor: shape} the key map reads, unused()'s shapes)."""
    with torch.device("meta"):
        model = BUILD[stage](cfg)
    want = {}
    for ours, link in KEY_MAPS[stage](model).items():
        for name, shape in zip(link.names, link.shapes):
            if want.setdefault(name, shape) != shape:  # two links disagree: a bug in the map
                raise AssertionError(f"key map {stage}: {name} read as {want[name]} and as {shape}")
    return model, want, {k: shape for k, (shape, _) in unused(stage, cfg).items()}


def match(stage, file, found, want, known_unused):
    """One clear line (ValueError) for the first missing, mis-shaped or unexpected tensor of a file."""
    for name, shape in want.items():
        if name not in found:
            raise ValueError(f"{file}: missing tensor {name} {list(shape)} ({len(found)} tensors in the file)")
    for name, shape in (want | known_unused).items():
        if name in found and tuple(found[name]) != tuple(shape):
            raise ValueError(f"{file}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")
    for name in sorted(found):
        if name not in want and name not in known_unused and not any(name.startswith(p) for p, _ in TOLERATED[stage]):
            raise ValueError(f"{file}: unexpected tensor {name} {list(found[name])}: not in the key map "
                             f"(another release or model?)")


def folder_configs(folder):
    """The release's configs, or the sizes a folder's CONFIG_FILE gives (the tests' tiny release)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        return release_configs()
    try:
        with open(path) as f:
            return release_configs(json.load(f))
    except (ValueError, TypeError) as e:  # bad JSON, or a field our configs do not have
        raise ValueError(f"{path}: not a config of this project's stages ({e})") from None


def check_folder(folder):
    """Every file's keys and shapes against the key maps, reading no tensor data. -> {stage: tensors}."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder (a download of huggingface.co/yinaoxiong/LanDiff)")
    cfgs = folder_configs(folder)
    counts = {}
    for stage, (file, container) in FILES.items():
        _, want, known_unused = expected(stage, cfgs[stage])
        found = read(os.path.join(folder, file), container, shapes_only=True)
        match(stage, file, found, want, known_unused)
        counts[stage] = len(found)
    return counts


def load_stage(folder, stage, cfg, dtype):
    """One module with the release's weights, strictly: built on the meta device (no random init), filled."""
    file, container = FILES[stage]
    model, want, known_unused = expected(stage, cfg)
    found = read(os.path.join(folder, file), container)
    match(stage, file, {k: t.shape for k, t in found.items()}, want, known_unused)
    ours = {k: link.join([found[n] for n in link.names]).to(dtype) for k, link in KEY_MAPS[stage](model).items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- the DiT's v-prediction, as a flow
def zero_snr_alphas_cumprod(steps=1000, beta_start=0.00085, beta_end=0.012, snr_shift=3.0):
    """ᾱ_i (steps,) float64 of the release DiT's DDPM (CogVideoX's): β evenly spaced in √β (LDM's "scaled
    linear"), ᾱ_i = Π_{j<=i} (1 − β_j); the SNR ᾱ/(1 − ᾱ) divided by snr_shift at every step (more noise:
    a video has many pixels per object); then √ᾱ rescaled so that the last step is pure noise, zero SNR
    (Lin et al., arXiv 2305.08891): √ᾱ <- (√ᾱ − √ᾱ_last)·√ᾱ_0 / (√ᾱ_0 − √ᾱ_last)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod = alphas_cumprod / (snr_shift + (1 - snr_shift) * alphas_cumprod)  # SNR -> SNR / snr_shift
    root = alphas_cumprod.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root ** 2


class VPrediction:
    """A v-prediction DDPM network (the release's DiT) seen as a flow model: euler_sample's parameterization.

    A DDPM state is x = α·x0 + σ·ε with α = √ᾱ_i, σ = √(1 − ᾱ_i) (α² + σ² = 1), and the network predicts
    v = α·ε − σ·x0 (Salimans & Ho, arXiv 2202.00512), so x0 = α·x − σ·v and ε = σ·x + α·v. Dividing the
    state by α + σ gives z = x / (α + σ) = (1 − t)·x0 + t·ε with t = σ / (α + σ): diffusion.py's flow path,
    whose velocity is ε − x0 = (σ − α)·x + (α + σ)·v. The network is fed its integer DDPM step i (a DiT
    with prediction="v"); euler_sample visits only the steps of flow_times, so each t has its own i.
    Plain Euler differs from the release's sampler: first-order deterministic steps, where it takes DPM++(2M)
    steps (second order in log-SNR) with fresh noise at each (an SDE sampler), and one constant guidance,
    where its "dynamic CFG" varies the scale step by step (configured 6 at 50 steps)."""

    def __init__(self, alphas_cumprod):
        self.alpha = alphas_cumprod.double().sqrt()  # (S,) from ~1 at step 0 to 0 at step S-1 (zero SNR)
        self.sigma = (1 - alphas_cumprod.double()).sqrt()

    def flow_times(self, steps):
        """(steps + 1,) fp32 flow times from 1 to 0: `steps` DDPM steps evenly spaced down from the last
        ("trailing": floor((S−1)(1 − k/steps)), k = 0..steps−1, as the release samples), then t = 0."""
        last = len(self.alpha) - 1
        index = torch.floor(last - torch.arange(steps, dtype=torch.float64) * last / steps).long()
        t = self.sigma[index] / (self.alpha[index] + self.sigma[index])
        return torch.cat([t, t.new_zeros(1)]).float()

    def step(self, t):
        """Flow times (B,) -> DDPM steps (B,) long and their α, σ (B,) float64: the step whose α is nearest."""
        t = t.double()
        alpha = (1 - t) / ((1 - t) ** 2 + t ** 2).sqrt()  # from t = σ / (α + σ) and α² + σ² = 1
        index = (self.alpha.to(t.device)[:, None] - alpha[None]).abs().argmin(dim=0)
        return index, self.alpha.to(t.device)[index], self.sigma.to(t.device)[index]

    def to_velocity(self, v, x, alpha, sigma):
        return (sigma - alpha) * x + (alpha + sigma) * v  # ε − x0

    def to_v(self, velocity, x, alpha, sigma):
        return (velocity - (sigma - alpha) * x) / (alpha + sigma)

    def clean_state(self, x0, t):
        """The flow state at time t (a 0-d tensor) whose DDPM state x = z·(α + σ) is x0: the release holds its
        clean prefix in x itself. 1 / (α + σ) = √((1 − t)² + t²), from t = σ / (α + σ) and α² + σ² = 1."""
        return x0 * ((1 - t) ** 2 + t ** 2).sqrt()

    def __call__(self, network, z, t):
        """network(x, step) -> v; z the flow state at flow times t (B,) -> its velocity, like z."""
        index, alpha, sigma = self.step(t)
        shape = (-1,) + (1,) * (z.dim() - 1)
        alpha = alpha.view(shape).to(z.dtype)
        sigma = sigma.view(shape).to(z.dtype)
        x = z * (alpha + sigma)  # the DDPM state the network was trained on
        return self.to_velocity(network(x, index.float()), x, alpha, sigma)


# ---------------------------------------------------------------------------- text encoders and the pipeline
class T5Text(torch.nn.Module):
    """A frozen T5 encoder (Hugging Face folder, through transformers): prompts -> (B, L, d_model).
    padded: always `length` tokens, pads included and attended, as CogVideoX feeds its DiT (226); else
    the prompt's own tokens and end token only, as the release feeds its LM (at most `length`)."""

    def __init__(self, folder, length, padded, dtype=torch.float32):
        super().__init__()
        try:
            from transformers import T5EncoderModel, T5Tokenizer
        except ImportError:
            raise ValueError("the T5 text encoders need transformers and sentencepiece: pip install -r "
                             "requirements-release.txt") from None
        self.words = T5Tokenizer.from_pretrained(folder)
        self.encoder = T5EncoderModel.from_pretrained(folder, dtype=dtype).eval().requires_grad_(False)  # 4.7 B
        self.length = length
        self.padded = padded

    def tokenize(self, prompts, strict=False):  # sample.py calls text(text.tokenize(prompts)); T5 reads any word
        return list(prompts)

    def forward(self, prompts):
        batch = self.words(prompts, max_length=self.length, truncation=True, return_tensors="pt",
                           padding="max_length" if self.padded else "longest")
        device = next(self.encoder.parameters()).device
        mask = None if self.padded else batch.attention_mask.to(device)
        out = self.encoder(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state
        return out if self.padded else out * mask[..., None]  # a batch's shorter prompts: zeros after their end


class StandInText(torch.nn.Module):
    """T5-XXL where it is absent (the full preset, a release folder without it): per prompt seeded random
    features of T5's shape (seed: crc32 of the prompt), zero after its words + T5's end token, like padded T5."""

    def __init__(self, dim, length):
        super().__init__()
        self.dim = dim
        self.length = length

    def tokenize(self, prompts, strict=False):  # the prompts themselves are the input; any word is allowed
        return list(prompts)

    def describe(self):  # for the warning that a run with it prints
        return f"a seeded random (B, {self.length}, {self.dim}) stand-in; the prompt only picks the seed"

    def forward(self, prompts):
        out = torch.zeros(len(prompts), self.length, self.dim)  # (B, L, dim)
        for row, prompt in enumerate(prompts):
            n_real = min(len(prompt.split()) + 1, self.length)
            seeded = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            out[row, :n_real] = torch.randn(n_real, self.dim, generator=seeded)
        return out


def text_encoder(folder, sub, dim, length, padded, dtype):
    """T5 from folder/sub when it is there; else StandInText, loudly: the clip then ignores the prompt."""
    path = os.path.join(folder, sub)
    if os.path.isdir(path):
        return T5Text(path, length, padded, dtype)
    stand_in = StandInText(dim, length)
    warn(f"no T5 in {path}: its text features are {stand_in.describe()}")
    return stand_in


def warn(message):
    """A warning no one can miss, between two rows of "!": the clip will not be what it seems."""
    banner = "!" * 100
    print(f"{banner}\nWARNING: {message}\n{banner}")


def load_release(folder, device="cpu", dtype=torch.float32, offload=False):
    """-> sample.Pipeline with the release's weights: stages on `device`, or waiting on the CPU when offload.
    Its DiT has prediction="v": diffusion.euler_sample samples it through VPrediction, on the release's step grid."""
    import sample
    check_folder(folder)  # every file's keys and shapes first: a bad folder fails before minutes of loading
    cfgs, home = folder_configs(folder), "cpu" if offload else device
    mods = {stage: load_stage(folder, stage, cfgs[stage], dtype).to(home) for stage in FILES}
    lm_text = text_encoder(folder, T5_LM, cfgs["lm"].text_dim, cfgs["lm"].text_len, False, dtype).to(home)
    dit_text = text_encoder(folder, T5_DIT, cfgs["dit"].text_dim, cfgs["dit"].text_len, True, dtype).to(home)
    p = sample.Pipeline(vae=mods["vae"], tok=mods["tokenizer"], text=lm_text, text_dit=dit_text, lm=mods["lm"],
                        dit=mods["dit"], control=mods["control"], device=torch.device(device), offload=offload,
                        parameterization=VPrediction(zero_snr_alphas_cumprod()))
    sample.check_contracts(p)
    return p


def meta_pipeline(folder):
    """sample.py --dry-run --weights: the folder's names and shapes checked (no data read), then the release's
    stages built on the current device (meta there), for tools/dry_run.py's parameter and memory report."""
    import sample
    counts = check_folder(folder)
    print(f"{folder}: every tensor's name and shape matches the key maps (tensors per file: {counts})")
    cfgs = folder_configs(folder)
    mods = {stage: BUILD[stage](cfgs[stage]) for stage in FILES}
    lm_text = StandInText(cfgs["lm"].text_dim, cfgs["lm"].text_len)
    p = sample.Pipeline(vae=mods["vae"], tok=mods["tokenizer"], text=lm_text, lm=mods["lm"], dit=mods["dit"],
                        control=mods["control"])
    sample.check_contracts(p)
    return p


def parse_args(ap, argv=None):
    """sample.py's arguments plus --weights DIR; with it, the full preset and the release's sampler defaults
    (SAMPLER_DEFAULTS) wherever the command line sets none."""
    ap.add_argument("--weights", metavar="DIR", help="the released LanDiff weights (release.py): full size, the "
                    "release's defaults (50 steps, guidance 7.5 LM / 6 DiT, motion 0.1, temperature 1)")
    args = ap.parse_args(argv)
    if args.weights:
        ap.set_defaults(preset="full", **SAMPLER_DEFAULTS)
        args = ap.parse_args(argv)
    return args


def main(argv=None):
    ap = argparse.ArgumentParser(prog="release.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--expected-keys", action="store_true", help="print {file: {tensor: shape}} as JSON")
    ap.add_argument("--check", metavar="DIR", help="check a release folder's keys and shapes (reads no data)")
    a = ap.parse_args(argv)
    if a.expected_keys:
        cfgs = release_configs()
        out = {}
        for stage, (file, _) in FILES.items():
            _, want, known_unused = expected(stage, cfgs[stage])
            out[file] = {k: list(s) for k, s in (want | known_unused).items()}
        json.dump(out, sys.stdout, indent=1)
        print()
    elif a.check:
        try:
            counts = check_folder(a.check)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{a.check}: every tensor's name and shape matches ({', '.join(f'{k} {n}' for k, n in counts.items())})")
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
