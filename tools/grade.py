"""grade.py: grade a student copy (tools/make_assignment.py) by its tests, and optionally by hidden inputs.

    python tools/grade.py /tmp/hw                 # the copy's tests, a table per exercise, /tmp/hw/grade.json
    python tools/grade.py .                       # the reference: full points
    python tools/grade.py /tmp/hw --oracle        # also compare the student's functions with this repository's
    python tools/grade.py /tmp/hw -- -x tests/test_tokenizer.py    # extra arguments go to pytest

Tests. Every test that grades an exercise carries `@pytest.mark.exercise(name, points=N)` (pytest.ini
registers it). The copy's tests run in a subprocess (cwd = the copy, its own pytest.ini) with a
small plugin that records each test's outcome, its exercise markers and, for a failure, the
exception; an exercise scores the points of its passed tests. A test may also carry
`@pytest.mark.uses(names)`: the exercises whose code it runs without grading them (an integration
test); those count in the table's last line only.

Hidden checks without hidden code (--oracle). The reference is public, so what is hidden is the
input: each exercise's functions, the student's and this repository's, are imported side by side
(importlib, distinct module names) and run on fresh random shapes, sizes and seeds drawn from
--seed (a new one each run unless given; the table prints it). Everything the exercise does not
cover is lent from the reference (the other exercises' functions, and sample.py's stages), so a
gap elsewhere does not fail this exercise. Outputs are compared in float64 with
max|student - reference| <= atol + rtol * max|reference|: rtol 1e-4 on a CPU, 2e-3 on CUDA and MPS
(TF32 is switched off); discrete outputs (indices, masks, layouts) exactly, sampled token ids up to
1% of rows (a float hair can tip one draw), uint8 frames within one level. Each exercise's oracle
is worth ORACLE_POINTS and counts as one more test of that exercise.

grade.json (for a learning-management system):
    {"exercises": {name: {"passed": n, "total": n, "points": x, "max_points": x}}, "points": x, "max_points": x}
The grader always exits 0 once it has graded (it is a grader, not a gate).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("vae", "tokenizer", "lm", "diffusion")
ORACLE_POINTS = 2
CASES = 3  # random cases per exercise oracle


# ---------------------------------------------------------------------------- the tests, in a subprocess


class Recorder:
    """pytest plugin: {nodeid: {"outcome", "exercises": [[name, points]], "uses": [names], "error"}}."""

    def __init__(self):
        self.tests = {}
        self.collect_errors = []

    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1]}")

    def pytest_runtest_logreport(self, report):
        record = self.tests.get(report.nodeid)
        if record is None:
            return
        if report.failed:
            record["outcome"] = "failed"
        elif report.skipped and record["outcome"] == "passed":
            record["outcome"] = "skipped"

    def pytest_runtest_makereport(self, item, call):
        record = self.tests.setdefault(item.nodeid, {
            "outcome": "passed",
            "exercises": [[m.args[0], m.kwargs.get("points", 1)] for m in item.iter_markers("exercise")],
            "uses": sorted({name for m in item.iter_markers("uses") for name in m.args}),
            "error": None})
        if call.excinfo is not None and record["error"] is None and not call.excinfo.errisinstance(
                __import__("pytest").skip.Exception):
            record["error"] = describe(call.excinfo.value)


def describe(error):
    """'TypeName: first line' of an exception; a NotImplementedError anywhere in its chain wins."""
    seen = error
    while seen is not None:
        if isinstance(seen, NotImplementedError):
            error = seen
            break
        seen = seen.__cause__ or seen.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _run_in_subprocess(out_json, args):
    """Entry point inside the subprocess: run pytest with the recorder, dump its records."""
    import pytest

    recorder = Recorder()
    code = pytest.main(list(args), plugins=[recorder])
    Path(out_json).write_text(json.dumps({"tests": recorder.tests, "collect_errors": recorder.collect_errors,
                                          "exit_code": int(code)}))
    return 0


def run_tests(folder, pytest_args=(), quiet=False):
    """Run the tests of `folder` (its own pytest.ini) -> {"tests": {...}, "collect_errors": [...], "exit_code"}."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "records.json"
        bootstrap = ("import importlib.util, sys; "
                     f"spec = importlib.util.spec_from_file_location('_landiff_grader', {str(Path(__file__).resolve())!r}); "
                     "grader = importlib.util.module_from_spec(spec); spec.loader.exec_module(grader); "
                     "sys.exit(grader._run_in_subprocess(sys.argv[1], sys.argv[2:]))")
        args = ["-q", "--tb=line" if quiet else "--tb=short", *pytest_args]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        output = subprocess.DEVNULL if quiet else None
        subprocess.run([sys.executable, "-c", bootstrap, str(out_json), *args], cwd=folder, env=env,
                       stdout=output, stderr=output)
        if not out_json.exists():
            raise SystemExit(f"error: pytest did not run in {folder} (is it a copy made by tools/make_assignment.py?)")
        return json.loads(out_json.read_text())


# ---------------------------------------------------------------------------- the table and grade.json


def tally(tests, oracle=None):
    """-> grade.json's dict from the test records (and the oracle's {name: (passed, message)})."""
    exercises = {}
    for record in tests.values():
        for name, points in record["exercises"]:
            entry = exercises.setdefault(name, {"passed": 0, "total": 0, "points": 0, "max_points": 0})
            entry["total"] += 1
            entry["max_points"] += points
            if record["outcome"] == "passed":
                entry["passed"] += 1
                entry["points"] += points
    for name, (passed, _) in (oracle or {}).items():
        entry = exercises.setdefault(name, {"passed": 0, "total": 0, "points": 0, "max_points": 0})
        entry["total"] += 1
        entry["max_points"] += ORACLE_POINTS
        entry["passed"] += int(passed)
        entry["points"] += ORACLE_POINTS * int(passed)
    exercises = dict(sorted(exercises.items()))
    return {"exercises": exercises, "points": sum(e["points"] for e in exercises.values()),
            "max_points": sum(e["max_points"] for e in exercises.values())}


def blockers(tests, name):
    """{other exercise: failed tests of `name` that stopped at its NotImplementedError} (a prerequisite not done)."""
    found = {}
    for record in tests.values():
        error = record["error"] or ""
        other = error.split(": ")[1] if error.startswith("NotImplementedError: ") else None
        if record["outcome"] == "failed" and other not in (None, name) and name in (n for n, _ in record["exercises"]):
            found[other] = found.get(other, 0) + 1
    return found


def table(grade, tests, oracle=None, seed=None):
    lines = [f"{'exercise':<16} {'passed':>9} {'points':>9}"]
    for name, e in grade["exercises"].items():
        waiting = ", ".join(f"{n} by {other}" for other, n in sorted(blockers(tests, name).items()))
        lines.append(f"{name:<16} {e['passed']:>4}/{e['total']:<4} {e['points']:>4g}/{e['max_points']:<4g}"
                     + (f"  (blocked: {waiting})" if waiting else ""))
    lines.append(f"{'total':<16} {'':>9} {grade['points']:>4g}/{grade['max_points']:<4g}")
    integration = [r for r in tests.values() if not r["exercises"] and r["uses"]]
    if integration:
        passed = sum(r["outcome"] == "passed" for r in integration)
        lines.append(f"tests that only use exercises (ungraded): {passed}/{len(integration)} passed")
    for name, (passed, message) in (oracle or {}).items():
        lines.append(f"oracle {name:<16} {'ok' if passed else 'FAILED'}{'' if passed else ': ' + message}")
    if oracle:
        lines.append(f"oracle seed {seed} (rerun with --seed {seed})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the oracle


def load(root, prefix, stage_modules=None):
    """Import root's stage files (and sample.py) under distinct names: prefix_vae, ... sample.py imports
    the stages by name; it gets `stage_modules` (the reference's) so that only its own code is judged."""
    mods = {}
    for name in STAGES:
        spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", Path(root) / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
        mods[name] = module
    stage_modules = stage_modules or mods
    saved = {name: sys.modules.get(name) for name in STAGES}
    sys.path.insert(0, str(root))  # sample.py's other imports (release.py) from root, the stages from stage_modules
    try:
        sys.modules.update(stage_modules)
        spec = importlib.util.spec_from_file_location(f"{prefix}_sample", Path(root) / "sample.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        mods["sample"] = module
    finally:
        sys.path.remove(str(root))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return mods


def block_owners(root):
    """{exercise: {(module, top-level name)}}: the functions and classes whose code holds its blocks."""
    import ast

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import make_assignment
    finally:
        sys.path.pop(0)
    owners = {}
    for module in (*STAGES, "sample"):
        source = (Path(root) / f"{module}.py").read_text(encoding="utf-8")
        tops = [(node.lineno, node.end_lineno, node.name) for node in ast.parse(source).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
        for name, _, begin, _, _ in make_assignment.find_blocks(source, module):
            for first, last, top in tops:
                if first <= begin <= last:
                    owners.setdefault(name, set()).add((module, top))
    return owners


@contextlib.contextmanager
def lent(student, ref, owners, exercise):
    """Give the student's modules the reference's functions of every other exercise, for the duration."""
    mine = owners.get(exercise, set())
    swaps = {(module, name) for other, places in owners.items() if other != exercise for module, name in places}
    swaps -= mine
    saved = {(module, name): getattr(student[module], name) for module, name in swaps}
    for module, name in swaps:
        setattr(student[module], name, getattr(ref[module], name))
    student["tokenizer"].sequence_layout.cache_clear()
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(student[module], name, value)
        student["tokenizer"].sequence_layout.cache_clear()


class Oracle:
    """The checks, one method per exercise: student vs reference on random inputs."""

    def __init__(self, student, ref, seed, device):
        import torch

        self.torch = torch
        self.student = student
        self.ref = ref
        self.device = torch.device(device)
        self.rng = random.Random(seed)
        self.seed = seed
        self.rtol = 1e-4 if self.device.type == "cpu" else 2e-3
        self.atol = 1e-6 if self.device.type == "cpu" else 1e-5
        self.pipeline_checked = False

    # helpers
    def gen(self, device="cpu"):
        return self.torch.Generator(device).manual_seed(self.rng.randrange(2**31))

    def randn(self, *shape, scale=1.0):
        return (self.torch.randn(*shape, generator=self.gen()) * scale).to(self.device)

    def close(self, mine, theirs, what, atol=None):
        mine, theirs = self.torch.as_tensor(mine), self.torch.as_tensor(theirs)
        assert mine.shape == theirs.shape, f"{what}: shape {tuple(mine.shape)}, expected {tuple(theirs.shape)}"
        if not theirs.is_floating_point():
            assert mine.dtype == theirs.dtype, f"{what}: dtype {mine.dtype}, expected {theirs.dtype}"
            wrong = int((mine != theirs).sum())
            assert wrong == 0, f"{what}: {wrong} of {theirs.numel()} entries differ"
            return
        mine, theirs = mine.detach().double().cpu(), theirs.detach().double().cpu()
        assert bool(self.torch.isfinite(mine).all()) == bool(self.torch.isfinite(theirs).all()), \
            f"{what}: non-finite values where the reference has none (or the reverse)"
        err = (mine - theirs).abs().max().item() if mine.numel() else 0.0
        tol = (self.atol if atol is None else atol) + self.rtol * (theirs.abs().max().item() if theirs.numel() else 0.0)
        assert err <= tol, f"{what}: max |difference| {err:.3g} > tolerance {tol:.3g}"

    def perturbed(self, module, scale=0.05):
        """Random weights everywhere: zero-inits would hide the paths they gate."""
        with self.torch.no_grad():
            for p in module.parameters():
                p.add_(scale * self.torch.randn(p.shape, generator=self.gen()).to(p))
        return module

    def twin(self, make, module):
        """The student's module class instance with the reference module's weights."""
        mine = make().to(self.device)
        mine.load_state_dict(module.state_dict())
        return mine

    def diffusion_cfg(self):
        d = self.ref["diffusion"]
        frames = self.rng.randint(2, 3)
        depth = self.rng.randint(1, 3)
        return d.DiffusionConfig(latent_ch=self.rng.choice([2, 4]), frames=frames, lat_h=4, lat_w=self.rng.choice([4, 8]),
                                 patch=2, width=32, depth=depth, heads=2, mlp=48, text_dim=16,
                                 text_len=self.rng.randint(1, 4), time_dim=24, control_depth=self.rng.randint(1, depth),
                                 sem_dim=12, sem_ch=6, sem_up=self.rng.randint(0, 1), up_ch=8, up_blocks=1,
                                 prefix=self.rng.randint(1, frames - 1), shift=self.rng.choice([1.0, 3.0]))

    def dit_pair(self, cfg):
        d = self.ref["diffusion"]
        dit = self.perturbed(d.DiT(cfg).to(self.device)).eval()
        control = self.perturbed(d.ControlNet(cfg).to(self.device)).eval()
        return dit, control

    def dit_inputs(self, cfg, batch):
        x = self.randn(batch, cfg.latent_ch, cfg.frames, cfg.lat_h, cfg.lat_w)
        t = self.torch.rand(batch, generator=self.gen()).to(self.device)
        text = self.randn(batch, cfg.text_len, cfg.text_dim)
        sem = self.randn(batch, cfg.frames, cfg.sem_dim, *cfg.sem_hw)
        return x, t, text, sem

    def lm_cfg(self):
        return self.ref["lm"].LMConfig(codebook_size=self.rng.randint(10, 60), n_i=self.rng.randint(1, 5),
                                       n_p=self.rng.randint(1, 3), frames=self.rng.randint(1, 4), width=32,
                                       depth=self.rng.randint(1, 2), heads=2, mlp=40, text_dim=16,
                                       text_len=self.rng.randint(1, 4), micro_dim=16, micro_hidden=16, code_levels=())

    # the exercises
    def attention(self):
        for module in ("tokenizer", "lm", "diffusion"):
            B, H, Nq, Nk = (self.rng.randint(1, 3), self.rng.randint(1, 3), self.rng.randint(1, 19),
                            self.rng.randint(1, 19))
            D = self.rng.choice([4, 8, 16, 32])
            q, k, v = self.randn(B, H, Nq, D), self.randn(B, H, Nk, D), self.randn(B, H, Nk, D, scale=2.0)
            mask = self.torch.rand(B, 1, Nq, Nk, generator=self.gen()).to(self.device) < 0.6
            mask[..., self.rng.randrange(Nk)] = True  # every query sees at least one key
            for m in (mask, mask[0, 0], None):
                self.close(self.student[module].attention(q, k, v, m, "manual"),
                           self.ref[module].attention(q, k, v, m, "manual"), f"{module}.attention, mask {m is not None}")

    def rope(self):
        for module in ("tokenizer", "lm"):
            n_pairs = self.rng.randint(1, 24)
            theta = self.rng.choice([10000.0, 500.0, 1e6])
            pos = self.torch.randint(0, 5000, (self.rng.randint(1, 40),), generator=self.gen()).to(self.device)
            mine, theirs = self.student[module].rope_angles(pos, n_pairs, theta), self.ref[module].rope_angles(pos, n_pairs, theta)
            self.close(mine, theirs, f"{module}.rope_angles")
            x = self.randn(self.rng.randint(1, 2), self.rng.randint(1, 3), len(pos), 2 * n_pairs)
            self.close(self.student[module].apply_rope(x, theirs.cos(), theirs.sin()),
                       self.ref[module].apply_rope(x, theirs.cos(), theirs.sin()), f"{module}.apply_rope")

    def rope_3d(self):
        frames, h, w = self.rng.randint(1, 4), self.rng.randint(1, 4), self.rng.randint(1, 4)
        split = tuple(self.rng.randint(1, 5) for _ in range(3))
        n_i, n_p = self.rng.randint(1, 6), self.rng.randint(1, 3)
        for decoder in (False, True):
            args = (frames, h, w, n_i, n_p, split, decoder, self.device)
            mine, theirs = self.student["tokenizer"].sequence_layout(*args), self.ref["tokenizer"].sequence_layout(*args)
            self.close(mine[0], theirs[0], "sequence_layout cos")
            self.close(mine[1], theirs[1], "sequence_layout sin")

    def fsq(self):
        levels = tuple(self.rng.randint(3, 9) for _ in range(self.rng.randint(1, 5)))
        mine, theirs = self.student["tokenizer"].FSQ(levels).to(self.device), self.ref["tokenizer"].FSQ(levels).to(self.device)
        z = self.randn(self.rng.randint(1, 300), len(levels), scale=self.rng.choice([0.5, 2.0, 5.0]))
        grads = []
        for fsq in (mine, theirs):
            zz = z.clone().requires_grad_()
            codes, indices = fsq(zz)
            (codes * self.torch.linspace(-1, 1, codes.numel()).to(codes).view_as(codes)).sum().backward()
            grads.append((codes, indices, zz.grad))
        self.close(grads[0][0], grads[1][0], f"FSQ{levels} codes")
        self.close(grads[0][1], grads[1][1], f"FSQ{levels} indices")
        self.close(grads[0][2], grads[1][2], f"FSQ{levels} straight-through gradient")
        indices = self.torch.randint(0, theirs.codebook_size, (50,), generator=self.gen()).to(self.device)
        self.close(mine.indices_to_codes(indices), theirs.indices_to_codes(indices), f"FSQ{levels}.indices_to_codes")
        codes = theirs.indices_to_codes(indices)
        self.close(mine.codes_to_indices(codes), theirs.codes_to_indices(codes), f"FSQ{levels}.codes_to_indices")

    def masks(self):
        frames, hw, n_i, n_p = self.rng.randint(1, 6), self.rng.randint(1, 12), self.rng.randint(1, 8), self.rng.randint(1, 5)
        time, is_frame = self.ref["tokenizer"].token_times(frames, hw, n_i, n_p, self.device)
        layout = f"frames {frames}, hw {hw}, n_i {n_i}, n_p {n_p}"
        self.close(self.student["tokenizer"].encoder_mask(time, is_frame), self.ref["tokenizer"].encoder_mask(time, is_frame),
                   f"encoder_mask ({layout})")
        self.close(self.student["tokenizer"].decoder_mask(time), self.ref["tokenizer"].decoder_mask(time),
                   f"decoder_mask ({layout})")

    def causal_conv(self):
        c_in, c_out, T = self.rng.randint(1, 4), self.rng.randint(1, 4), self.rng.randint(1, 7)
        theirs = self.ref["vae"].CausalConv3d(c_in, c_out).to(self.device)
        mine = self.twin(lambda: self.student["vae"].CausalConv3d(c_in, c_out), theirs)
        x = self.randn(self.rng.randint(1, 2), c_in, T, self.rng.randint(2, 6), self.rng.randint(2, 6))
        with self.torch.no_grad():
            self.close(mine(x), theirs(x), "CausalConv3d on a whole clip")
            cut = sorted(self.rng.sample(range(1, T), min(T - 1, 2))) if T > 1 else []
            pieces = [x[:, :, a:b] for a, b in zip([0, *cut], [*cut, T])]
            cache_mine, cache_theirs = {}, {}
            self.close(self.torch.cat([mine(p, cache_mine) for p in pieces], 2),
                       self.torch.cat([theirs(p, cache_theirs) for p in pieces], 2), f"CausalConv3d in chunks {cut}")

    def lm_sequence(self):
        cfg, n_seg = self.lm_cfg(), self.rng.randint(1, 3)
        self.close(self.student["lm"].token_layout(cfg, n_seg), self.ref["lm"].token_layout(cfg, n_seg), "token_layout")
        model = self.perturbed(self.ref["lm"].SemanticLM(cfg).to(self.device)).eval()
        B = self.rng.randint(1, 3)
        codes = self.torch.randint(0, cfg.codebook_size, (B, n_seg * cfg.tokens_per_segment), generator=self.gen()).to(self.device)
        text = self.randn(B, self.rng.randint(1, cfg.text_len), cfg.text_dim)
        frames = self.torch.randint(1, cfg.frames_max + 1, (B,), generator=self.gen()).to(self.device)
        motion = (self.torch.rand(B, generator=self.gen()) * cfg.motion_max).to(self.device)
        with self.torch.no_grad():
            self.close(self.student["lm"].lm_loss(model, codes, text, frames, motion),
                       self.ref["lm"].lm_loss(model, codes, text, frames, motion), "lm_loss")

    def kv_cache(self):
        cfg = self.lm_cfg()
        theirs = self.perturbed(self.ref["lm"].SemanticLM(cfg).to(self.device)).eval()
        mine = self.twin(lambda: self.student["lm"].SemanticLM(cfg), theirs).eval()
        B, N = self.rng.randint(1, 3), self.rng.randint(3, 20)
        x = self.randn(B, N, cfg.width)
        with self.torch.no_grad():
            whole = theirs(x)
            cache = mine.new_cache(B, N)
            cuts = sorted(self.rng.sample(range(1, N), self.rng.randint(1, min(4, N - 1))))
            pieces = [mine(x[:, a:b], cache, a) for a, b in zip([0, *cuts], [*cuts, N])]
        self.close(self.torch.cat(pieces, 1), whole, f"SemanticLM with a KV cache, pieces at {cuts}")

    def lm_sampling(self):
        rows, V = 256, self.rng.randint(5, 80)
        for guidance, temperature, top_k, top_p in ((1.0, 0, None, None), (self.rng.uniform(1.5, 4), 0, None, None),
                                                    (1.0, self.rng.uniform(0.5, 1.5), self.rng.randint(1, V), None),
                                                    (self.rng.uniform(1.5, 4), 1.0, None, self.rng.uniform(0.2, 0.95)),
                                                    (1.0, 0.8, self.rng.randint(1, V), self.rng.uniform(0.2, 0.95))):
            logits = self.randn(rows * (1 if guidance == 1.0 else 2), V, scale=3.0)
            seed = self.rng.randrange(2**31)
            picks = [mod["lm"]._pick(logits, guidance, temperature, top_k, top_p,
                                     self.torch.Generator(self.device).manual_seed(seed)) for mod in (self.student, self.ref)]
            what = f"_pick(guidance {guidance:.2f}, temperature {temperature}, top_k {top_k}, top_p {top_p})"
            assert picks[0].shape == picks[1].shape, f"{what}: shape {tuple(picks[0].shape)}, expected {tuple(picks[1].shape)}"
            wrong = int((picks[0] != picks[1]).sum())
            assert wrong <= rows // 100, f"{what}: {wrong} of {rows} draws differ from the reference's with the same generator"

    def expert_adaln(self):
        B, L, N, D, time_dim = (self.rng.randint(1, 3), self.rng.randint(1, 5), self.rng.randint(1, 9),
                                self.rng.choice([8, 16, 24]), self.rng.choice([8, 12]))
        norm = self.perturbed(self.torch.nn.LayerNorm(D).to(self.device), 0.5)
        ada = self.torch.nn.Linear(time_dim, 6 * D).to(self.device)
        emb, txt, vid = self.randn(B, time_dim), self.randn(B, L, D), self.randn(B, N, D)
        with self.torch.no_grad():
            mine = self.student["diffusion"].expert_adaln(norm, ada, emb, txt, vid)
            theirs = self.ref["diffusion"].expert_adaln(norm, ada, emb, txt, vid)
        assert len(mine) == 4, f"expert_adaln returned {len(mine)} values, expected 4 (h_txt, h_vid, g_txt, g_vid)"
        for name, a, b in zip(("text h", "video h", "text gate", "video gate"), mine, theirs):
            self.close(self.torch.broadcast_to(a, b.shape), b, f"expert_adaln {name}")

    def controlnet(self):
        cfg = self.diffusion_cfg()
        dit, control = self.dit_pair(cfg)
        d = self.student["diffusion"]
        my_dit, my_control = self.twin(lambda: d.DiT(cfg), dit).eval(), self.twin(lambda: d.ControlNet(cfg), control).eval()
        x, t, text, sem = self.dit_inputs(cfg, self.rng.randint(1, 2))
        with self.torch.no_grad():
            theirs = control(x, t, text, sem)
            mine = my_control(x, t, text, sem)
            assert len(mine) == len(theirs), f"ControlNet returned {len(mine)} residuals, expected {len(theirs)}"
            for i, (a, b) in enumerate(zip(mine, theirs)):
                self.close(a, b, f"ControlNet residual {i}")
            self.close(my_dit(x, t, text, theirs), dit(x, t, text, theirs), "DiT with the control residuals")

    def flow_matching(self):
        cfg = self.diffusion_cfg()
        dit, control = self.dit_pair(cfg)
        x0, _, text, sem = self.dit_inputs(cfg, self.rng.randint(2, 4))
        n = self.rng.randint(1, 9)
        seed = self.rng.randrange(2**31)
        self.close(self.student["diffusion"].sample_t(n, cfg.shift, self.torch.Generator().manual_seed(seed), self.device),
                   self.ref["diffusion"].sample_t(n, cfg.shift, self.torch.Generator().manual_seed(seed), self.device),
                   "sample_t")
        for training in (False, True):
            control.train(training)
            prefix = self.rng.randint(0, cfg.frames - 1)
            with self.torch.no_grad():
                losses = [mod["diffusion"].fm_loss(dit, x0, text, control, sem, prefix,
                                                   self.torch.Generator().manual_seed(seed)) for mod in (self.student, self.ref)]
            self.close(losses[0], losses[1], f"fm_loss (training mode {training}, prefix {prefix})")
        control.eval()

    def euler(self):
        cfg = self.diffusion_cfg()
        dit, control = self.dit_pair(cfg)
        noise, _, text, sem = self.dit_inputs(cfg, self.rng.randint(1, 2))
        steps = self.rng.randint(1, 4)
        guidance = self.rng.choice([1.0, self.rng.uniform(1.5, 4)])
        for branch in ((None, None), (control, sem)):
            out = [mod["diffusion"].euler_sample(dit, noise, text, steps, guidance, *branch) for mod in (self.student, self.ref)]
            self.close(out[0], out[1], f"euler_sample({steps} steps, guidance {guidance:.2f}, ControlNet {branch[0] is not None})")

    def streaming(self):
        cfg = self.diffusion_cfg()
        dit, control = self.dit_pair(cfg)
        noise, _, text, sem = self.dit_inputs(cfg, 1)
        prefix = self.randn(1, cfg.latent_ch, self.rng.randint(1, cfg.frames - 1), cfg.lat_h, cfg.lat_w)
        steps = self.rng.randint(1, 3)
        out = [mod["diffusion"].euler_sample(dit, noise, text, steps, 1.0, control, sem, prefix)
               for mod in (self.student, self.ref)]
        self.close(out[0], out[1], f"euler_sample with a {prefix.shape[2]}-frame prefix")
        if self.pipeline_checked:  # the whole pipeline once per run is enough, and costs seconds
            return
        self.pipeline_checked = True
        # sample.py's window loop, on a random tiny pipeline of the reference's stages
        sample = self.ref["sample"]
        with self.torch.random.fork_rng():
            pipeline = sample.random_pipeline("tiny", seed=self.rng.randrange(2**31))
        for m in (pipeline.dit, pipeline.control):
            self.perturbed(m)
        for m in pipeline.modules():
            m.to(self.device).eval()
        frames = 1 + (pipeline.dit.cfg.frames - 1) * pipeline.vae.cfg.temporal_factor
        frames += self.rng.randint(1, 2) * (pipeline.dit.cfg.frames - pipeline.dit.cfg.prefix) * pipeline.vae.cfg.temporal_factor
        seed = self.rng.randrange(2**31)
        videos = [mod["sample"].generate_video(pipeline, ["a red circle"], frames, seed=seed, steps=1, temperature=0)
                  for mod in (self.student, self.ref)]
        # uint8 frames: one level of rounding is the float tolerance's trace, more is a wrong window
        self.close(videos[0].float(), videos[1].float(), f"generate_video, {frames} frames", atol=1.0)


def run_oracle(folder, reference, seed, device, names=None):
    """-> {exercise: (passed, message)} for every exercise the reference marks and the oracle knows
    (or those of `names`)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = load(reference, "oracle_reference")
    student = load(folder, "oracle_student", {name: ref[name] for name in STAGES})
    owners = block_owners(reference)
    results = {}
    for name in sorted(owners):
        check = getattr(Oracle, name, None)
        if check is None or (names is not None and name not in names):
            continue
        oracle = Oracle(student, ref, seed + sum(map(ord, name)), device)
        try:
            with lent(student, ref, owners, name), torch.random.fork_rng(devices=[]):
                for _ in range(CASES):
                    check(oracle)
            results[name] = (True, "")
        except AssertionError as e:
            results[name] = (False, str(e).splitlines()[0] if str(e) else "a check failed")
        except NotImplementedError as e:
            results[name] = (False, f"not implemented ({e})")
        except Exception as e:  # the student's code crashed: name where
            where = traceback.extract_tb(e.__traceback__)[-1]
            results[name] = (False, f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})")
    return results


# ---------------------------------------------------------------------------- the command line


def main(argv=None):
    ap = argparse.ArgumentParser(prog="grade.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a student copy (tools/make_assignment.py), or . for the reference")
    ap.add_argument("--oracle", action="store_true", help="also compare with this repository on fresh random inputs")
    ap.add_argument("--seed", type=int, help="the oracle's seed (default: a new one each run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="where the oracle runs")
    ap.add_argument("--reference", default=str(ROOT), help="the reference repository (default: this one)")
    ap.add_argument("--quiet", action="store_true", help="hide pytest's own output")
    argv = sys.argv[1:] if argv is None else list(argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: extra pytest arguments
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    folder = Path(a.folder)
    if not (folder / "pytest.ini").is_file() or not (folder / "tests").is_dir():
        raise SystemExit(f"error: {folder} holds no pytest.ini and tests/; pass a copy made by tools/make_assignment.py")
    run = run_tests(folder, pytest_args, a.quiet)
    for line in run["collect_errors"]:
        print(f"could not collect {line}")
    oracle = None
    seed = a.seed
    if a.oracle:
        seed = seed if seed is not None else random.SystemRandom().randrange(10**6)
        if folder.resolve() == Path(a.reference).resolve():
            print("note: the oracle compares the reference with itself")
        oracle = run_oracle(folder, a.reference, seed, a.device)
    grade = tally(run["tests"], oracle)
    print(table(grade, run["tests"], oracle, seed))
    (folder / "grade.json").write_text(json.dumps(grade, indent=1) + "\n")
    print(f"wrote {folder / 'grade.json'}: {grade['points']:g}/{grade['max_points']:g} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
