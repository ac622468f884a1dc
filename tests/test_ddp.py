"""Real 2-process DDP on CPU (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_sampling_replicas_and_sample_memory(tmp_path):
    r = subprocess.run(
        [sys.executable, str(HERE / "ddp_indices.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    expected = sorted(ranks[0]["train_indices"])
    assert len(expected) == 300
    for epoch in ("0", "1"):
        per_rank = [rk["seen"][epoch] for rk in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 150
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == expected
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled per epoch
    # gradients were synchronised: both replicas end with the same student
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-6)
    assert not ranks[0]["teacher_params_in_ddp"]
    # per-sample memory (PS-KD): every rank's writes are gathered, so both replicas hold the
    # same table, covering every training sample
    for rk in ranks:
        assert rk["memory_written"] == expected
    assert ranks[0]["memory_digest"] == pytest.approx(ranks[1]["memory_digest"], rel=1e-9)
