"""The course machinery (docs/EXERCISES.md): tools/make_assignment.py's markers and refusals, the
round trip (a copy with every exercise blanked imports, each exercise's tests fail there with its
NotImplementedError and nothing else fails), tools/grade.py's grade.json, and the oracle catching a
wrong answer that the public tests were not shown."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import grade, make_assignment

ROOT = Path(__file__).resolve().parent.parent
IN_A_STUDENT_COPY = (ROOT / make_assignment.STAMP).exists()  # its blocks are gone: nothing to round-trip
reference_only = pytest.mark.skipif(IN_A_STUDENT_COPY, reason="runs in the reference, which holds the solutions")

SOURCE = "\n".join([
    "def f(x):",
    "    y = 1",
    "    # BEGIN SOLUTION alpha: add y",
    "    z = x + y",
    "    return z",
    "    # END SOLUTION",
    "",
    "class A:",
    "    def g(self):",
    "        # BEGIN SOLUTION beta",
    "        return 2",
    "        # END SOLUTION",
    "",
    'TEXT = """',
    "# BEGIN SOLUTION gamma: inside a string, so not a marker",
    '"""',
    ""])


def test_blocks_become_one_raise_at_their_indentation():
    blocks = make_assignment.find_blocks(SOURCE)
    assert [(name, hint, indent) for name, hint, _, _, indent in blocks] == [
        ("alpha", "add y", 4), ("beta", "implement this block", 8)]
    only_alpha = make_assignment.strip_blocks(SOURCE, blocks, {"alpha"})
    assert '    raise NotImplementedError("alpha: add y")\n' in only_alpha
    assert "z = x + y" not in only_alpha and "        return 2\n" in only_alpha
    assert "SOLUTION alpha" not in only_alpha and "SOLUTION beta" not in only_alpha  # markers gone either way
    assert "# BEGIN SOLUTION gamma" in only_alpha  # the string is text
    namespace = {}
    exec(compile(make_assignment.strip_blocks(SOURCE, blocks, {"beta"}), "<copy>", "exec"), namespace)
    assert namespace["f"](1) == 2
    with pytest.raises(NotImplementedError, match="^beta: implement this block$"):
        namespace["A"]().g()


@pytest.mark.parametrize("lines, says", [
    (["# BEGIN SOLUTION a", "x = 1"], "never closed"),
    (["x = 1", "# END SOLUTION"], "without a BEGIN"),
    (["# BEGIN SOLUTION a", "# BEGIN SOLUTION b", "# END SOLUTION", "# END SOLUTION"], "nested"),
    (["# BEGIN SOLUTION", "x = 1", "# END SOLUTION"], "needs a name"),
    (["if True:", "    # BEGIN SOLUTION a", "    x = 1", "# END SOLUTION"], "indented"),
])
def test_bad_markers_are_refused_with_the_line(lines, says):
    with pytest.raises(make_assignment.MarkerError, match=says) as error:
        make_assignment.find_blocks("\n".join(lines) + "\n", "m.py")
    assert str(error.value).startswith("m.py:")


@reference_only
def test_unknown_names_and_used_folders_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown exercise.*nosuch.*known: .*fsq"):
        make_assignment.main(["--out", str(tmp_path / "hw"), "--only", "fsq,nosuch"])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        make_assignment.main(["--out", str(tmp_path / "used")])
    with pytest.raises(SystemExit, match="inside the repository"):
        make_assignment.main(["--out", str(ROOT / "hw")])


@pytest.fixture(scope="module")
def blanked(tmp_path_factory):
    """A copy with every exercise blanked, and its tests' records as tools/grade.py sees them."""
    out = tmp_path_factory.mktemp("round_trip") / "hw"
    names = make_assignment.make_assignment(out)
    return out, names, grade.run_tests(out, quiet=True)


@reference_only
def test_round_trip_every_exercise_fails_alone_and_nothing_else(blanked):
    out, names, run = blanked
    assert len(names) >= 10, names
    imports = "import vae, tokenizer, lm, diffusion, sample, train_tiny; from exercises import stretch"
    subprocess.run([sys.executable, "-c", imports], cwd=out, check=True)  # a blanked copy still imports
    assert not run["collect_errors"], run["collect_errors"]
    graded = {}
    for nodeid, record in run["tests"].items():
        tied = {name for name, _ in record["exercises"]} | set(record["uses"])
        assert tied <= set(names), f"{nodeid} names exercises without a solution block: {tied - set(names)}"
        for name, _ in record["exercises"]:
            graded.setdefault(name, []).append(nodeid)
        if record["exercises"]:  # a graded test fails, with the NotImplementedError of an exercise it names
            error = record["error"] or ""
            raised = error.split(": ")[1] if error.startswith("NotImplementedError: ") else None
            assert record["outcome"] == "failed", f"{nodeid} grades {tied} but passes with them blanked"
            assert raised in tied, f"{nodeid} (tied to {sorted(tied)}) failed with {error!r}"
        elif not tied:  # a test tied to no exercise passes
            assert record["outcome"] in ("passed", "skipped"), f"{nodeid} (tied to nothing) failed: {record['error']}"
        # an integration test (uses only) may fail any way: tools/bench.py, e.g., reports a row's error and goes on
    assert set(graded) == set(names), f"exercises without a graded test: {set(names) - set(graded)}"
    result = grade.tally(run["tests"])
    assert set(result["exercises"]) == set(names) and result["points"] == 0 and result["max_points"] > 0
    assert all(e["points"] == 0 and e["passed"] == 0 and e["total"] > 0 for e in result["exercises"].values())


@reference_only
def test_grade_writes_grade_json_and_exits_zero(blanked, capsys):
    out, names, _ = blanked
    assert grade.main([str(out), "--quiet", "--", "tests/test_exercises_stretch.py"]) == 0
    result = json.loads((out / "grade.json").read_text())
    assert set(result) == {"exercises", "points", "max_points"}
    assert set(result["exercises"]) == {"stretch_heun", "stretch_vpred", "stretch_vq"}
    for entry in result["exercises"].values():
        assert set(entry) == {"passed", "total", "points", "max_points"} and entry["points"] == 0
    printed = capsys.readouterr().out
    assert "stretch_heun" in printed and "0/5" in printed


@reference_only
def test_oracle_catches_what_the_tests_were_not_shown(blanked, tmp_path, monkeypatch):
    out, _, _ = blanked
    # as `python tools/grade.py` runs: the repository is not on sys.path (sample.py must still find release.py)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])
    monkeypatch.delitem(sys.modules, "release", raising=False)
    results = grade.run_oracle(out, ROOT, seed=1, device="cpu", names={"masks", "causal_conv"})
    assert sorted(results) == ["causal_conv", "masks"]
    for name, (passed, message) in results.items():
        assert not passed and message.startswith(f"not implemented ({name}: "), message
    # a student copy with every solution in place but one wrong comparison in the decoder mask
    copy = tmp_path / "hw"
    make_assignment.make_assignment(copy, only=[])
    tokenizer = copy / "tokenizer.py"
    right = "return time[None, :] <= time[:, None]"
    assert tokenizer.read_text().count(right) == 1
    tokenizer.write_text(tokenizer.read_text().replace(right, right.replace("<=", "<")))
    results = grade.run_oracle(copy, ROOT, seed=2, device="cpu", names={"masks", "fsq", "attention"})
    assert results["fsq"] == (True, "") and results["attention"] == (True, "")
    assert not results["masks"][0] and "decoder_mask" in results["masks"][1], results["masks"]
