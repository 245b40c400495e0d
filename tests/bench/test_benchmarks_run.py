"""Each benchmark runs end to end from a cold checkpoint cache (tiny size, one step), so a
benchmark that breaks is found by the tests, not by the next person who measures."""

import os
import subprocess
import sys

import pytest

from harness import REPO_ROOT

pytestmark = pytest.mark.comfy  # ComfyUI in the benchmark's worker process

BENCHMARKS = {
    "bench_dpo_trainer.py": ["--size", "64", "--steps", "1"],
    "bench_joint_sampler.py": ["--size", "64", "--steps", "1", "--images", "1", "--repeats", "1"],
    "bench_data_parallel.py": ["--size", "64", "--steps", "1", "--batch-size", "2"],
}


@pytest.mark.parametrize("script", list(BENCHMARKS))
def test_benchmark_runs_from_a_cold_cache(script, tmp_path):
    cache = tmp_path / "checkpoints"  # empty: the tiny checkpoint is built on the way
    command = [sys.executable, os.path.join(REPO_ROOT, "bench", script), *BENCHMARKS[script]]
    process = subprocess.run(
        [*command, "--devices", "cpu", "--cache", str(cache)], capture_output=True, text=True, timeout=900
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert os.listdir(cache), "the benchmark did not build its checkpoint in the cold cache"
    ratio_column = {
        "bench_dpo_trainer.py": "x core",
        "bench_joint_sampler.py": "x KSampler(N)",
        "bench_data_parallel.py": "x 1 process",
    }[script]
    assert ratio_column in process.stdout, process.stdout  # the report with its ratios was printed
