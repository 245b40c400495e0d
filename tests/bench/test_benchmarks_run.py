"""Each benchmark runs end to end from a cold checkpoint cache (tiny size, one step), so a
benchmark that breaks is found by the tests, not by the next person who measures.

The DiT runs use the tiny SD3 (seconds); Flux is left out here: its 0.55 B-parameter model
(1.1 GB to build in a cold cache) makes a run take minutes on a CPU, and the benchmarks run the
same code for both DiTs (Flux's DPO and joint paths are tested in tests/integration/test_dit.py).
What a Flux report prints where core cannot train it is checked on a made-up result below.

The runs are on ComfyUI 0.33 only (``current_comfyui``: CI's hour); the benchmarks themselves
run on both versions (BENCHMARKS.md)."""

import os
import subprocess
import sys

import pytest

from harness import REPO_ROOT

JOINT = ["--size", "64", "--steps", "1", "--images", "1", "--repeats", "1"]
BENCHMARKS = {
    "bench_dpo_trainer.py": ["--size", "64", "--steps", "1", "--objectives"],
    "bench_joint_sampler.py": JOINT,
    "bench_data_parallel.py": ["--size", "64", "--steps", "1", "--batch-size", "2"],
    # The DiT path of the benchmarks' shared loading; the joint one's DiT path is the same code.
    "bench_dpo_trainer.py --model sd3": ["--model", "sd3", "--size", "64", "--steps", "1"],
}
RATIO_COLUMN = {
    "bench_dpo_trainer.py": "x core",
    "bench_joint_sampler.py": "x KSampler(N)",
    "bench_data_parallel.py": "x 1 process",
}


@pytest.mark.comfy  # ComfyUI in the benchmark's worker process
@pytest.mark.current_comfyui
@pytest.mark.parametrize("run", list(BENCHMARKS))
def test_benchmark_runs_from_a_cold_cache(run, tmp_path):
    script = run.split()[0]
    cache = tmp_path / "checkpoints"  # empty: the tiny checkpoint (or DiT) is built on the way
    command = [sys.executable, os.path.join(REPO_ROOT, "bench", script), *BENCHMARKS[run]]
    process = subprocess.run(
        [*command, "--devices", "cpu", "--cache", str(cache)], capture_output=True, text=True, timeout=900
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert os.listdir(cache), "the benchmark did not build its model in the cold cache"
    assert RATIO_COLUMN[script] in process.stdout, process.stdout  # the report with its ratios was printed
    if "--objectives" in BENCHMARKS[run]:  # the supervised term's and a preview's cost, as plain steps
        assert "x a plain step" in process.stdout and "plain steps; one every 25 steps" in process.stdout
    if "--model" in run:
        assert "tiny_sd3_dit" in process.stdout, process.stdout
        assert "cannot train" not in process.stdout, process.stdout  # core TrainLoraNode trains SD3


def test_dpo_report_says_why_core_cannot_train():
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    import bench_dpo_trainer

    args = bench_dpo_trainer.parse_args(["--model", "flux", "--devices", "cpu"])
    reason = bench_dpo_trainer.core_failure(
        RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            "operation: [torch.FloatTensor [4, 32, 3072]] ... Hint: enable anomaly detection"
        ),
        "flux",
    )
    result = {
        "device": "cpu",
        "threads": 2,
        "software": "ComfyUI x, torch y",
        "dtype": "fp32",
        "checkpoint": "tiny_flux_dit_r1_s0.safetensors",
        "checkpoint_depth": 0,
        "results": {
            "TrainLoraNode, weight": {"error": reason},
            "DPO LoRA Trainer, weight": {"steps": [2.0, 1.0, 1.0], "peak_mib": 100.0},
        },
    }
    lines = bench_dpo_trainer.report(result, args).splitlines()
    core = next(line for line in lines if line.startswith("TrainLoraNode, weight"))
    assert "cannot train: RuntimeError: one of the variables" in core and "in place" in core and "Hint" not in core
    ours = next(line for line in lines if line.startswith("DPO LoRA Trainer, weight"))
    assert ours.split()[4:6] == ["1.000", "-"], ours  # s/step, and no ratio without a core baseline
    assert any("not the model's" in line for line in lines)
