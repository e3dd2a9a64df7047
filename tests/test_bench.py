"""bench.py without its heavy rows: the FSQ rows as installed here (peer or not), every other
stage's row with the peers hidden (CI has none), and the train_tiny row on a stub script."""
import json
from types import SimpleNamespace

import pytest
import torch

from tools import bench


@pytest.mark.uses("fsq")
def test_fsq_rows_compare_when_the_peer_is_installed(capsys):
    rows = bench.main(["--only", "fsq", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    have_peer = bench.optional("vector_quantize_pytorch") is not None
    assert [r.stage.split()[0] for r in rows] == ["fsq", "fsq"] and all(r.ours > 0 for r in rows)
    for r in rows:
        if have_peer:  # the parity column is filled, and FSQ must agree bit for bit
            assert r.ok and r.peer > 0 and float(r.parity.split(",")[0]) <= 1e-4 and "codes+ids ==" in r.parity
        else:  # a one-line skip note, our timing still in the table
            assert r.ok and r.peer is None and r.parity == "-" and r.notes == [bench.SKIP]
    assert out.count(bench.SKIP) == (0 if have_peer else 2)
    assert f"torch {torch.__version__}" in out and "1 thread(s)" in out and "| ratio |" in out


@pytest.mark.uses("causal_conv", "expert_adaln", "kv_cache", "lm_sampling", "lm_sequence", "rope")
def test_missing_peers_skip_the_comparison_not_the_row(monkeypatch, capsys):
    monkeypatch.setattr(bench, "optional", lambda module: None)  # as in CI: no peer package at all
    rows = bench.main(["--only", "dit", "--only", "vae,lm", "--quick", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert [r.stage.split()[0] for r in rows] == ["dit", "vae", "lm"]
    assert all(r.ok and r.ours > 0 and r.peer is None and r.parity == "-" for r in rows)
    assert out.count(bench.SKIP) == 3 and "tok/s" in out
    with pytest.raises(SystemExit, match="--only takes fsq, lm, dit, vae, sample, train_tiny"):
        bench.main(["--only", "fsq,dti"])


def test_train_tiny_row_reads_the_report_and_times_a_run(tmp_path):
    a = SimpleNamespace(threads=1)
    assert bench.bench_train_tiny(a, run=False, root=tmp_path)[0].ours is None  # no report yet: a note, no crash
    # a stand-in train_tiny.py that writes its report as the real one does
    (tmp_path / "train_tiny.py").write_text(
        "import json, os\nos.makedirs('out/tiny', exist_ok=True)\n"
        "json.dump({'vae': {'seconds': 3.0, 'metric': {}}, 'lm': {'seconds': 4.0, 'metric': {}}, "
        "'total_seconds': 7.5}, open('out/tiny/report.json', 'w'))\n")
    (row,) = bench.bench_train_tiny(a, run=True, root=tmp_path)
    assert row.ok and 0 < row.ours < 30 and any("vae 3 s, lm 4 s" in n for n in row.notes)
    (row,) = bench.bench_train_tiny(a, run=False, root=tmp_path)
    assert row.ours == 7.5 and json.loads((tmp_path / "out/tiny/report.json").read_text())["total_seconds"] == 7.5
    (tmp_path / "train_tiny.py").write_text("raise SystemExit(3)\n")
    (row,) = bench.bench_train_tiny(a, run=True, root=tmp_path)
    assert not row.ok and "exit status 3" in row.parity
