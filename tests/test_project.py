"""Project-wide rules: the copied primitives stay identical, stage files stand alone,
and every stage offers the same preset names."""
import ast
import importlib
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ["vae.py", "tokenizer.py", "lm.py", "diffusion.py"]
BLOCK = re.compile(
    r"^# ---- copied primitive: (\w+) \(identical in ([\w., ]+); tests/test_project\.py\) ----\n"
    r"(.*?)^# ---- end copied primitive ----$",
    re.S | re.M,
)


def _blocks():
    """{name: {file: (declared files, text)}} for every marked copy."""
    found = {}
    for f in STAGES:
        for name, declared, text in BLOCK.findall((ROOT / f).read_text()):
            assert name not in found.get(name, {}), f"{f} holds two copies of {name}"
            found.setdefault(name, {})[f] = ({d.strip() for d in declared.split(",")}, text)
    return found


def test_copied_primitives_identical():
    found = _blocks()
    assert {"attention", "rope", "timestep_embedding"} <= set(found), f"missing primitives: {sorted(found)}"
    for name, copies in found.items():
        texts = {f: text for f, (_, text) in copies.items()}
        declared = {frozenset(d) for d, _ in copies.values()}
        assert len(declared) == 1, f"{name}: copies disagree on where they live: {declared}"
        (where,) = declared
        assert set(copies) == set(where), f"{name}: declared in {sorted(where)}, found in {sorted(copies)}"
        assert len(copies) >= 2, f"{name} is marked as copied but lives in one file"
        first = next(iter(texts.values()))
        for f, t in texts.items():
            assert t == first, f"{name} in {f} differs from its other copies: edit all of {sorted(texts)} together"


def test_stage_files_import_only_torch_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for f in STAGES:
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] in allowed, f"{f} imports {m}: stage files import only torch and the stdlib"


@pytest.mark.parametrize("stage", [s[:-3] for s in STAGES])
def test_presets_share_names(stage):
    mod = importlib.import_module(stage)
    presets = getattr(mod, "PRESETS", None)
    if presets is None:
        pytest.skip(f"{stage}.py has no PRESETS yet")
    assert list(presets) == ["tiny", "full"], f"{stage}.PRESETS keys are {list(presets)}"
    # defaults equal "tiny": the dataclass with no arguments is the tiny preset
    assert type(presets["tiny"])() == presets["tiny"], f"{stage}: the config's defaults must equal PRESETS['tiny']"
