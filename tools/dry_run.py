"""tools/dry_run.py: the full LanDiff pipeline's size on any machine, without allocating it.

    python sample.py --preset full --dry-run      # [--frames 73] for a streamed clip; --preset tiny too

Every stage is built on PyTorch's meta device (tensors with shapes and dtypes, no storage, no
arithmetic) and called once the way sample.py calls it; a TorchDispatchMode sees every tensor the
call creates and keeps the largest. Printed per stage: parameters, output shape, largest activation;
then a bf16 peak-memory estimate (resident weights + the largest activation, a lower bound) with and
without sample.py's stage offload. Attention is replaced by its output shape: fused SDPA kernels
never build the (N, N) score matrix that the meta device would otherwise trace.
"""
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion
import lm
import tokenizer


def dry_run(p, preset, frames, K):
    """p: every stage built on the meta device (sample.random_pipeline under torch.device("meta"): shapes
    only, no memory, no arithmetic); a `frames`-frame clip takes K diffusion windows. Runs one call of
    each stage and prints parameters, tensor shapes and a bf16 peak-memory estimate. -> {stage: parameters}.
    The caller builds the pipeline, so this file needs no import of sample.py (no import circle)."""
    class Largest(TorchDispatchMode):  # sees every op a stage runs and keeps the largest tensor made
        nbytes, shape = 0, ()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.nbytes > self.nbytes:
                    self.nbytes, self.shape = t.nbytes, tuple(t.shape)
            return out

    for m in p.modules():
        m.to(torch.bfloat16)
    d, l, t, v = p.dit.cfg, p.lm.cfg, p.tok.cfg, p.vae.cfg
    n_sem = 1 + (frames - 1) // v.temporal_factor
    e = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    x, tt, txt = e(2, d.latent_ch, d.frames, d.lat_h, d.lat_w), e(2), e(2, d.text_len, d.text_dim)  # CFG: 2 rows
    P, S = 4 + d.text_len, len(lm.token_layout(l, K)) - 1  # the LM's prefix and its sampling steps

    def lm_call():  # prefill, then one decoding step (every later step has its shapes)
        cache = p.lm.new_cache(2, P + S)
        p.lm(e(2, P, l.width), cache)
        p.lm(e(2, 1, l.width), cache, P)
        return e(1, l.tokens_per_segment, dtype=torch.long)  # window 0's segment (later ones: the new frames' codes)

    def control_call():  # the hint is made once per window (as in euler_sample), then one step's residuals
        hint = p.control.hint(e(1, d.frames, d.sem_dim, *d.sem_hw))
        return p.control(x, tt, txt, hint=torch.cat([hint, hint]))
    # the LM and tokenizer write each window's semantics just before it, while the DiT and ControlNet wait on the GPU
    rows = [("text encoder", p.text, [p.text], lambda: e(1, d.text_len, d.text_dim)),
            ("LM", p.lm, [p.dit, p.control, p.lm], lm_call),
            ("tokenizer", p.tok, [p.dit, p.control, p.tok], lambda: p.tok.decoder(e(1, t.n_tokens, t.code_dim))),
            ("ControlNet + upsampler", p.control, [p.dit, p.control], control_call),  # both on the GPU
            ("DiT", p.dit, [p.dit, p.control], lambda: p.dit(x, tt, txt, [e(2, d.seq, d.width)] * d.control_depth)),
            ("VAE", p.vae, [p.vae] + [p.dit, p.control] * (K > 1),  # streaming: it decodes the frames to re-encode
             lambda: p.vae.decode(e(1, v.z_ch, n_sem, d.lat_h, d.lat_w), chunk=2))]
    n = lambda *ms: sum(q.numel() for m in ms for q in m.parameters())  # noqa: E731
    size = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"  # noqa: E731
    print(f"{preset} preset, one {frames}-frame {t.image_h}x{t.image_w} clip ({K} window(s)), batch 1 (CFG: 2 rows in "
          f"the LM and DiT), every stage on the meta device\n{'stage':<24}{'parameters':>14}  {'output':<28}largest activation")
    params, peaks, fused = {}, {}, lambda q, k, val, mask=None, impl="sdpa": q.new_empty(*q.shape[:-1], val.shape[-1])
    # fused SDPA kernels never build the (N, N) scores, but on meta torch would trace its math path
    with mock.patch.object(lm, "attention", fused), mock.patch.object(tokenizer, "attention", fused), \
            mock.patch.object(diffusion, "attention", fused):
        for name, module, resident, call in rows:
            with Largest() as big:
                out = call()
            params[name] = None if preset == "full" and name == "text encoder" else n(module)
            peaks[name] = (2 * n(*resident) + big.nbytes, big.nbytes)  # (resident weights + activation, activation)
            shape = f"{len(out)} x {tuple(out[0].shape)}" if isinstance(out, list) else str(tuple(out.shape))
            print(f"{name:<24}{'none' if params[name] is None else f'{params[name]:,}':>14}  {shape:<28}" +
                  ("T5-XXL is not included: a seeded random stand-in" if params[name] is None else
                   f"{big.shape} {size(big.nbytes)}"))
    params["total"] = sum(c for k, c in params.items() if c and k != "text encoder")
    top, w_all, act = max(peaks, key=peaks.get), 2 * n(*p.modules()), max(a for _, a in peaks.values())
    print(f"{'total':<24}{params['total']:>14,}  = {params['total'] / 1e9:.2f} B without the text encoder (as the "
          f"paper's '5B'), {size(2 * params['total'])} in bf16\npeak memory in bf16, estimated (not measured) as resident "
          f"weights + the largest activation, a lower bound:\n  stage offload (one stage on the GPU, beside the DiT and "
          f"ControlNet while they denoise): {size(peaks[top][0])} in {'denoising' if top in ('DiT', 'ControlNet + upsampler') else top}\n"
          f"  no offload (all weights resident): {size(w_all + act)} = {size(w_all)} + {size(act)}")
    return params

