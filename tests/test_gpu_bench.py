"""scripts/gpu_bench.sh end to end on the CPU (DP_GPU_BENCH_DEVICE=cpu: tiny models, 64 px, presets cut to a few
steps): every part runs, its numbers land in gpu_bench.json and the log, the GPU-only part is reported as
skipped, and it uses the wheels scripts/gpu_check.sh prepares (nothing from the internet)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import tiny_diffusers as td

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_bench.sh"


def test_gpu_bench_runs_every_part_on_a_cpu(tmp_path):
    tokenizer = Path(td.require_sd1_tokenizer_dir())
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DP_GPU_BENCH_DEVICE": "cpu", "DP_GPU_BENCH_PYTHON": sys.executable,
           "DP_GPU_BENCH_WORK": str(work), "DP_GPU_BENCH_CARRY": str(tmp_path / "no-wheels"), "OUT": str(out),
           "DP_COMFYUI_DIR": str(tokenizer.parent.parent)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_bench.txt").read_text()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SKIPPED part 5-compiled: GPU-only" in log and "SKIPPED peak GPU memory: GPU-only" in log
    merged = json.loads((out / "gpu_bench.json").read_text())
    parts = merged["parts"]
    assert merged["device"] == "cpu" and set(parts) == {"1-components", "2-e2e", "3-faces", "4-paper"}
    rows = {row["component"]: row for row in parts["1-components"]["components"]}
    per_timestep = rows["MSI cost per timestep seen"]
    # the ratio is of the unrounded times; recomputed from the rounded ones it may differ in the last digit
    assert per_timestep["ratio"] == pytest.approx(per_timestep["optimised"] / per_timestep["reference"], abs=2e-3)
    assert {"inversion step (batch 1)", "guided anonymize step (batch 4)",
            "decode + recognizer fwd+bwd (batch 4)"} <= set(rows)
    assert [r["preset"] for r in parts["2-e2e"]["e2e"]] == ["fast", "default"]
    assert all(r["plumbing"] and r["seconds"] > 0 for r in parts["2-e2e"]["e2e"] + parts["4-paper"]["e2e"])
    assert [r["batch"] for r in parts["1-components"]["batch"]] == [1, 2]
    faces = parts["3-faces"]["faces"]
    assert [r["faces"] for r in faces] == [1, 2]
    # two faces: one at a time and in one batch, both measured in the run, and their ratio
    assert faces[1]["faces_in_one_batch"] == 2 and faces[1]["one_at_a_time_s"] > 0 and faces[1]["batched_s"] > 0
    assert faces[1]["ratio"] == pytest.approx(faces[1]["batched_s"] / faces[1]["one_at_a_time_s"], abs=0.02)
    assert parts["1-components"]["config"]["threads"] == 1


def test_gpu_bench_fails_when_the_budget_leaves_no_time_for_the_required_parts(tmp_path):
    tokenizer = Path(td.require_sd1_tokenizer_dir())
    env = {**os.environ, "DP_GPU_BENCH_DEVICE": "cpu", "DP_GPU_BENCH_PYTHON": sys.executable,
           "DP_GPU_BENCH_BUDGET_S": "5", "DP_GPU_BENCH_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "DP_GPU_BENCH_CARRY": str(tmp_path / "no-wheels"), "DP_COMFYUI_DIR": str(tokenizer.parent.parent)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "SKIPPED part 1-components: 5 s left" in result.stdout and "a required part failed" in result.stdout
    assert json.loads((tmp_path / "out" / "gpu_bench.json").read_text())["parts"] == {}


def test_gpu_bench_needs_only_the_checks_wheels():
    """The benchmark travels with the wheels gpu_check.sh prepare downloads: diffusers and facenet-pytorch are
    among them, and the script documents the one-line device call."""
    check = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    wheels = set(re.findall(r"\b([A-Za-z][\w.-]*)==", re.search(r"^WHEELS=\((.*?)\)", check, re.S | re.M).group(1)))
    assert {"diffusers", "facenet-pytorch"} <= wheels
    bench = SCRIPT.read_text()
    assert 'device run: command "bash scripts/gpu_bench.sh", carry [".whl"]' in bench
    assert "gpu_check.sh prepare" in bench and "pip download" not in bench
