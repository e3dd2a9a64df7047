"""release.py against the release's own key lists (tests/fixtures/release_keys.json), and a synthetic
release folder at tiny size: the release's file formats and tensor names, each name and shape derived
from the release's lists (not from our modules), random values. It must load strictly, sample end to
end, and fail with one clear line when broken."""
import argparse
import json
import math
import os
import pathlib
import re
import shutil

import pytest
import torch

import release
import sample

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
RELEASE_KEYS = json.loads((FIXTURES / "release_keys.json").read_text())

# The tiny folder's configs (written to release.CONFIG_FILE). Sizes that are equal at full size stay equal
# here (the tokenizer's width = feature width = 768; the DiT's head dim = patch²·latent = sem_ch = 64, its
# time_dim = upsampler width = 512), so that every full-size number in a shape has one tiny counterpart
# (SHRINK). The DiT's MLP is 4 × width and the upsampler's narrow level 32 channels, as diffusers and the
# release's GroupNorm(32) need (test_parity_with_the_released_modules).
TINY = {
    "tokenizer": dict(feat_dim=64, frames=3, feat_h=2, feat_w=3, width=64, enc_depth=1, dec_depth=1, heads=2, mlp=256,
                      n_i=6, n_p=2, rope_split=(4, 6, 6), vq_codes=32, vq_dim=4, image_h=32, image_w=48),
    "lm": dict(codebook_size=32, n_i=6, n_p=2, frames=3, width=32, depth=1, heads=2, mlp=48, text_dim=24, text_len=8,
               micro_dim=16, micro_hidden=20),
    "dit": dict(latent_ch=4, frames=3, lat_h=4, lat_w=6, width=32, depth=2, heads=2, mlp=128, text_dim=24, text_len=8,
                time_dim=128, control_depth=1, sem_dim=64, sem_ch=16, up_ch=128, up_blocks=2, prefix=1),
    "vae": dict(base_ch=8, n_res=1, z_ch=4, groups=4),
}
DIT_SIZES = {1920: 32, 5760: 96, 23040: 384, 3840: 64, 7680: 128, 512: 128, 4096: 24, 16: 4, 64: 16, 768: 64, 128: 32}
SHRINK = {  # file -> {full-size number in a shape: tiny number}; 1, 2 and 3 (kernels, patch, RGB) stay
    "tokenizer/model.safetensors": {768: 64, 3072: 256, 1536: 128, 330: 6, 74: 2, 2048: 32, 16: 4},
    "llm/model.safetensors": {2048: 32, 2055: 39, 6144: 96, 11008: 48, 4096: 24, 256: 16, 512: 20},
    "diffusion/1/mp_rank_00_model_states.pt": DIT_SIZES,
    "CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt": DIT_SIZES,
    "CogVideoX-2b-sat/vae/3d-vae.pt": {128: 8, 256: 16, 512: 32, 16: 4, 32: 8},
}
KEEP = {  # file -> [(pattern, index group, how many the tiny config keeps)]: layers beyond the tiny depth go
    "tokenizer/model.safetensors": [(r"\.transformer\.(\d+)\.", 1, 1)],
    "llm/model.safetensors": [(r"^transformer\.blocks\.(\d+)\.", 1, 1)],
    "diffusion/1/mp_rank_00_model_states.pt": [(r"(layers|adaLN_modulations|layernorm_list|zero_linears)\.(\d+)\.", 2, 1),
                                               (r"upsample_model\.up\.\d+\.block\.(\d+)\.", 1, 2)],
    "CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt": [(r"(layers|adaLN_modulations|layernorm_list)\.(\d+)\.", 2, 2)],
    "CogVideoX-2b-sat/vae/3d-vae.pt": [(r"^encoder\.down\.\d+\.block\.(\d+)\.", 1, 1), (r"^decoder\.up\.\d+\.block\.(\d+)\.", 1, 2)],
}


# these tests run the stages' code: in a student copy (docs/EXERCISES.md) they may fail with its NotImplementedError
runs_the_stages = pytest.mark.uses("causal_conv", "controlnet", "euler", "expert_adaln", "kv_cache", "lm_sampling",
                                   "lm_sequence", "masks", "rope", "rope_3d", "streaming")


class Opaque:  # a class torch.load(weights_only=True) must refuse
    pass


def tiny_release_tensors(seed=0):
    """{file: {release name: random tensor}} at tiny size."""
    gen = torch.Generator().manual_seed(seed)
    files = {}
    for file, keys in RELEASE_KEYS.items():
        if file.startswith("_"):
            continue
        files[file] = {}
        for name, shape in keys.items():
            if any(int(re.search(p, name)[i]) >= n for p, i, n in KEEP[file] if re.search(p, name)):
                continue
            tiny = [d if d <= 3 else SHRINK[file][d] for d in shape]
            files[file][name] = 0.2 * torch.randn(tiny, generator=gen)
    return files


def write_release(folder, files):
    """The release's formats: flat safetensors, SAT/DeepSpeed model states (["module"], with DeepSpeed's
    metadata and SAT's argparse.Namespace), the VAE's ["state_dict"] (with a training-loss tensor)."""
    from safetensors.torch import save_file
    for file, tensors in files.items():
        path = os.path.join(folder, file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if file.endswith(".safetensors"):
            save_file(tensors, path)
        elif file.endswith("3d-vae.pt"):
            torch.save({"state_dict": tensors | {"loss.logvar": torch.zeros(())}, "global_step": 1}, path)
        else:
            torch.save({"module": tensors, "buffer_names": [], "global_steps": 1000, "dp_world_size": 1,
                        "mp_world_size": 1, "ds_version": "0.14.0", "iteration": 1000,
                        "args": argparse.Namespace(mode="inference")}, path)
    with open(os.path.join(folder, release.CONFIG_FILE), "w") as f:
        json.dump(TINY, f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("safetensors")
    path = tmp_path_factory.mktemp("release")
    write_release(str(path), tiny_release_tensors())
    return str(path)


def test_expected_keys_are_the_release_lists(capsys):
    release.main(["--expected-keys"])
    ours = json.loads(capsys.readouterr().out)
    theirs = {f: keys for f, keys in RELEASE_KEYS.items() if not f.startswith("_")}
    assert sorted(ours) == sorted(theirs)
    for file in theirs:
        missing = sorted(set(theirs[file]) - set(ours[file]))
        extra = sorted(set(ours[file]) - set(theirs[file]))
        assert not missing and not extra, f"{file}: missing {missing[:3]}, extra {extra[:3]}"
        shapes = {k for k in theirs[file] if theirs[file][k] != ours[file][k]}
        assert not shapes, f"{file}: shapes differ for {sorted(shapes)[:3]}"


@runs_the_stages
def test_synthetic_release_loads_strictly_and_matches_the_file(folder):
    assert release.check_folder(folder)["tokenizer"] == len(tiny_release_tensors()["tokenizer/model.safetensors"])
    p = release.load_release(folder)
    files = tiny_release_tensors()
    tok, sat = files["tokenizer/model.safetensors"], files["CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt"]
    x = torch.randn(5, 64)
    # two linears in a row, multiplied out into one: the same map
    theirs = torch.nn.functional.linear(x, tok["encoder.proj_out.weight"], tok["encoder.proj_out.bias"])
    theirs = torch.nn.functional.linear(theirs, tok["quantizer.project_in.weight"], tok["quantizer.project_in.bias"])
    torch.testing.assert_close(p.tok.encoder.to_code(x), theirs)
    torch.testing.assert_close(p.tok.quantizer.codebook, tok["quantizer._codebook.embed"][0])
    # SAT's fused q/k/v and its 12 adaLN chunks, split
    qkv = sat["model.diffusion_model.transformer.layers.1.attention.query_key_value.weight"]
    assert torch.equal(p.dit.blocks[1].k.weight, qkv[32:64])
    ada = sat["model.diffusion_model.mixins.adaln_layer.adaLN_modulations.1.1.bias"].chunk(12)
    assert torch.equal(p.dit.blocks[1].ada2.bias, torch.cat([ada[3], ada[4], ada[5], ada[9], ada[10], ada[11]]))
    lm_file = files["llm/model.safetensors"]
    assert torch.equal(p.lm.blocks[0].w13.weight[48:], lm_file["transformer.blocks.0.mlp.w3.weight"])
    assert p.dit.cfg.prediction == "v" and p.control.cfg.prediction == "v" and p.lm.cfg.micro_raw
    video = sample.generate_video(p, ["a red circle moving left"], frames=9, steps=3, guidance_lm=7.5, guidance_dit=6.0)
    assert video.shape == (1, 9, 32, 48, 3) and video.dtype == torch.uint8


@runs_the_stages
def test_sample_cli_with_weights(folder, tmp_path, capsys):
    sample.main(["--weights", folder, "--dry-run"])
    assert "every tensor's name and shape matches" in capsys.readouterr().out
    out = tmp_path / "x.gif"
    sample.main(["--weights", folder, "--prompt", "a red circle moving left", "--out", str(out), "--steps", "4"])
    assert out.exists() and out.stat().st_size > 0


def _broken(folder, tmp_path, file, change):
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    path = copy / file
    if change is None:
        path.unlink()
        return str(copy)
    files = tiny_release_tensors()
    change(files[file])
    write_release(str(copy), {file: files[file]})
    return str(copy)


@pytest.mark.parametrize("file, change, says", [
    ("CogVideoX-2b-sat/vae/3d-vae.pt", None, "3d-vae.pt: missing file"),
    ("llm/model.safetensors", lambda t: t.update({"transformer.head.weight": torch.zeros(40, 32)}),
     "llm/model.safetensors: tensor transformer.head.weight has shape [40, 32], expected [39, 32]"),
    ("diffusion/1/mp_rank_00_model_states.pt", lambda t: t.update({"model.control_model.diffusion_model.extra": torch.zeros(2)}),
     "unexpected tensor model.control_model.diffusion_model.extra [2]"),
    ("tokenizer/model.safetensors", lambda t: t.pop("decoder.mask_token"), "missing tensor decoder.mask_token [1, 1, 64]"),
    ("CogVideoX-2b-sat/transformer/1000/mp_rank_00_model_states.pt", lambda t: t.update({"x": Opaque()}),
     "not on release.SAT_ALLOWLIST"),
])
def test_a_broken_folder_fails_with_one_line(folder, tmp_path, capsys, file, change, says):
    broken = _broken(folder, tmp_path, file, change)
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        release.check_folder(broken)
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=re.escape(says)):
        sample.main(["--weights", broken, "--dry-run"])


# ---------------------------------------------------------------------------- parity with the released modules
@runs_the_stages
def test_parity_with_the_released_modules(folder):
    """Ours, loaded by release.py from the synthetic folder, against what the released modules computed from
    the same tensors on the same inputs (tests/fixtures/release_parity.json says how it was made)."""
    ref = json.loads((FIXTURES / "release_parity.json").read_text())
    cfgs = release.folder_configs(folder)
    load = {stage: release.load_stage(folder, stage, cfgs[stage], torch.float32) for stage in release.FILES}
    t, d = cfgs["tokenizer"], cfgs["dit"]
    close = lambda ours, theirs: torch.testing.assert_close(ours.flatten(), torch.tensor(theirs), atol=2e-5, rtol=1e-4)  # noqa: E731
    gen = torch.Generator().manual_seed(1)  # the tokenizer's inputs
    feats = torch.randn(1, t.frames, t.feat_dim, t.feat_h, t.feat_w, generator=gen)
    ids = torch.randint(0, t.vq_codes, (1, t.n_tokens), generator=gen)
    with torch.no_grad():
        close(load["tokenizer"].encoder(feats), ref["tokenizer"]["encoded_codes"])
        assert load["tokenizer"].encode(feats).flatten().tolist() == ref["tokenizer"]["encoded_ids"]
        close(load["tokenizer"].decode(ids), ref["tokenizer"]["decoded"])
        gen = torch.Generator().manual_seed(2)  # the DiT's, the VAE's and the upsampler's inputs, in this order
        x = torch.randn(2, d.latent_ch, d.frames, d.lat_h, d.lat_w, generator=gen)
        text = torch.randn(2, d.text_len, d.text_dim, generator=gen)
        close(load["dit"](x, torch.tensor(ref["dit"]["steps"]).float(), text), ref["dit"]["v"])
        image = torch.rand(1, 3, 1, 32, 48, generator=gen) * 2 - 1
        z = torch.randn(1, 4, 1, 4, 6, generator=gen)
        close(load["vae"].encoder(image), ref["vae"]["moments"])
        close(load["vae"].decoder(z).flatten()[::7], ref["vae"]["frames_every_7th"])
        sem = torch.randn(2, d.frames, d.sem_dim, *d.sem_hw, generator=gen)
        close(load["control"].hint(sem).transpose(1, 2), ref["upsampler"]["hint"])  # theirs: frame by frame
        gen = torch.Generator().manual_seed(3)  # the LM's: [BOS][frames 3][motion 0.1][5 text slots][SOI] + 4 codes
        text = torch.randn(1, 5, cfgs["lm"].text_dim, generator=gen)
        codes = torch.randint(0, cfgs["lm"].codebook_size, (4,), generator=gen)
        x = torch.cat([load["lm"].prefix(text, 3, 0.1), load["lm"].embed_ids(codes)[None]], dim=1)
        close(load["lm"](x), ref["lm"]["logits"])


# ---------------------------------------------------------------------------- the v-prediction adapter
def test_zero_snr_schedule_matches_diffusers():
    """Reference: diffusers 0.42.1's rescale_zero_terminal_snr on the SNR-shifted scaled-linear betas
    (tests/fixtures/zero_snr_reference.json, made by tests/fixtures/make_zero_snr_reference.py)."""
    ref = json.loads((FIXTURES / "zero_snr_reference.json").read_text())
    ours = release.zero_snr_alphas_cumprod()
    assert ours[-1] == 0  # zero SNR: the last step is pure noise
    for step, value in ref["alphas_cumprod"].items():
        assert math.isclose(ours[int(step)].item(), value, rel_tol=1e-5, abs_tol=1e-9), step


def test_vprediction_with_an_oracle_lands_on_x0_and_round_trips():
    vpred = release.VPrediction(release.zero_snr_alphas_cumprod())
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)
    z = torch.randn_like(x0)  # t = 1: pure noise
    ts = vpred.flow_times(10).double()
    for i in range(10):
        t = ts[i].expand(2)

        def oracle(x, step):  # the true v of this state for the clean x0: v = α ε − σ x0, ε from x
            _, alpha, sigma = vpred.step(t)
            alpha, sigma = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
            eps = (x - alpha * x0) / sigma
            return alpha * eps - sigma * x0
        z = z + (ts[i + 1] - ts[i]) * vpred(oracle, z, t)
    torch.testing.assert_close(z, x0)
    _, alpha, sigma = vpred.step(torch.tensor([0.3, 0.9]))
    alpha, sigma = alpha.view(-1, 1, 1), sigma.view(-1, 1, 1)
    v, x = torch.randn_like(x0), torch.randn_like(x0)
    torch.testing.assert_close(vpred.to_v(vpred.to_velocity(v, x, alpha, sigma), x, alpha, sigma), v)


def test_t5_text_encoders_pad_for_the_dit_and_not_for_the_lm(tmp_path):
    """release.T5Text on a tiny random T5 (transformers) with a tiny sentencepiece vocabulary trained here."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle moving left", "a blue square moving up", "green triangle going down"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spiece"), vocab_size=28, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1)
    folder = str(tmp_path / "t5")
    transformers.T5Tokenizer(vocab_file=str(tmp_path / "spiece.model"), extra_ids=0).save_pretrained(folder)
    config = transformers.T5Config(vocab_size=28, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=3)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    dit_text = release.T5Text(folder, 40, padded=True)
    lm_text = release.T5Text(folder, 40, padded=False, dtype=torch.bfloat16)
    prompts = lm_text.tokenize(["a red circle"], strict=True)  # T5 reads any word
    padded = dit_text(prompts)
    short = lm_text(prompts)
    assert padded.shape == (1, 40, 24) and padded.dtype == torch.float32  # always `length` tokens, as CogVideoX's DiT
    assert short.shape[1] < 40 and short.dtype == torch.bfloat16  # only the prompt's tokens and its end token
