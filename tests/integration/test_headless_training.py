"""The headless trainer (tools/train_dpo.py) on the tiny SD1.5 checkpoint, CPU: a job exported as
Export Training Job writes it, trained on 1 and on 2 processes (accelerate launch, gloo), a killed
worker, and bad jobs."""

import os
import re
import signal
import subprocess
import sys

import pytest
import safetensors
import safetensors.torch
import torch

from harness.comfy_server import DEFAULT_CACHE, REPO_ROOT, comfyui_path
from harness.pairs import uniform_pairs
from harness.tiny_checkpoint import DENOISER_PROMPT, LATENT_SHAPE, ensure_checkpoint

pytestmark = pytest.mark.comfy

TOOL = os.path.join(REPO_ROOT, "tools", "train_dpo.py")
OPTIONS = dict(loss_mode="dpo", beta=500.0, steps=2, batch_size=2, rank=4, alpha=4.0, learning_rate=1e-4, seed=3)


@pytest.fixture(scope="module")
def tiny(comfy_modules):
    import comfy.sd

    path = ensure_checkpoint(comfyui_path(), os.path.join(DEFAULT_CACHE, "checkpoints"), kind="sd15")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(DENOISER_PROMPT), return_pooled=True)
    return path, model, [[cond, {"pooled_output": pooled}]]


def pair_set(conditioning, count, size=LATENT_SHAPE, seed=0):
    latents = torch.randn(2 * count, *size, generator=torch.Generator().manual_seed(seed))
    return uniform_pairs(conditioning, latents[:count], latents[count:])


def export(tiny, folder, pairs=None, **options):
    from prefpersonalize.trainers.jobs import export_job

    path, model, conditioning = tiny
    pairs = pairs if pairs is not None else pair_set(conditioning, 4)
    return export_job(
        pairs,
        model,
        str(folder),
        model_kind="checkpoint",
        model_path=path,
        options={**OPTIONS, **options},
        layout="kohya",
    )


def train(job, *flags, processes=None):
    """Run the command; returns (exit code, everything it printed)."""
    command = [sys.executable, TOOL, job, *flags, "--cpu"]
    command += ["--processes", str(processes)] if processes else []
    environment = {**os.environ, "COMFYUI_PATH": comfyui_path()}
    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    return run.returncode, run.stdout + run.stderr


def logged_losses(output):
    return [float(loss) for loss in re.findall(r"step \d+/\d+ loss (-?[\d.]+)", output)]


def test_two_processes_train_the_lora_one_process_trains(tiny, tmp_path):
    job = export(tiny, tmp_path / "job")
    assert sorted(os.listdir(tmp_path / "job")) == ["job.json", "pairs.json", "pairs.safetensors"]
    one_code, one = train(job, "--output", str(tmp_path / "one"))
    two_code, two = train(job, "--output", str(tmp_path / "two"), processes=2)
    assert one_code == 0 and two_code == 0, one + two
    assert "process 1 of 2" in two and "process 1 of 2" not in one
    assert sorted(os.listdir(tmp_path / "two")) == ["job.safetensors", "job.state.safetensors", "job_plot.png"]
    assert len(logged_losses(one)) == 2 and logged_losses(one) == pytest.approx(logged_losses(two), rel=1e-3)

    first = safetensors.torch.load_file(tmp_path / "one" / "job.safetensors")
    second = safetensors.torch.load_file(tmp_path / "two" / "job.safetensors")
    assert first.keys() == second.keys()
    differences = torch.cat([(first[key] - second[key]).abs().flatten() for key in first])
    # The same global batches, split across the processes: the LoRAs agree to rounding. AdamW's
    # first steps are sign-like (g / (|g| + eps)), so an element whose gradient is at rounding
    # level (a direction the loss ignores) may step either way: allow a few, by at most 2 lr per step.
    assert (differences > 1e-6).float().mean() < 1e-3, (differences > 1e-6).sum()
    assert differences.max() <= 2 * OPTIONS["learning_rate"] * OPTIONS["steps"] + 1e-6
    moved = torch.cat([first[key].flatten() for key in first if key.endswith("lora_down.weight")]).abs()
    assert (moved > 0.5 * OPTIONS["learning_rate"]).float().mean() > 0.5  # and they did train
    with safetensors.safe_open(tmp_path / "two" / "job.safetensors", "pt") as file:
        header = file.metadata()
    assert header["prefp_processes"] == "2" and header["ss_steps"] == "2" and header["prefp_pair_count"] == "4"

    # the state written beside the LoRA continues the run (the node reads the same file)
    state = str(tmp_path / "one" / "job.state.safetensors")
    code, resumed = train(job, "--output", str(tmp_path / "three"), "--resume-state", state)
    assert code == 0 and "step 3/4" in resumed and "step 4/4" in resumed, resumed
    with safetensors.safe_open(tmp_path / "three" / "job.safetensors", "pt") as file:
        assert file.metadata()["ss_steps"] == "4"
    code, refused = train(job, "--output", str(tmp_path / "four"), "--resume-state", state, "--rank", "8")
    assert code != 0 and "other options (rank 4 -> 8)" in refused, refused


def test_a_killed_worker_stops_the_run_and_the_last_lora_stays_whole(tiny, tmp_path):
    job = export(tiny, tmp_path / "job", steps=400, save_every=1)
    command = [sys.executable, TOOL, job, "--cpu", "--processes", "2"]
    environment = {**os.environ, "COMFYUI_PATH": comfyui_path()}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    printed, worker, checkpoints = [], None, 0
    for line in run.stdout:
        printed.append(line)
        found = re.search(r"process 1 of 2 \(pid (\d+)\)", line)
        worker = int(found.group(1)) if found else worker
        checkpoints += line.startswith("saved LoRA checkpoint: ")
        if worker and checkpoints == 2:
            os.kill(worker, signal.SIGKILL)
            break
    printed += run.stdout.readlines()
    code = run.wait(timeout=300)
    output = "".join(printed)
    assert code != 0, output
    message = re.search(r"training stopped: a training process failed or was killed.* checkpoint is (\S+)\.", output)
    assert message, output
    last = message.group(1)
    with safetensors.safe_open(last, "pt") as file:  # whole: it opens, with its header and tensors
        assert int(file.metadata()["ss_steps"]) >= 2 and len(list(file.keys())) > 10
    assert not [name for name in os.listdir(tmp_path / "job") if ".partial" in name or ".tmp" in name]


def test_the_node_and_a_job_share_one_path_to_the_settings(comfy_modules):
    """The trainer node's inputs are the options, with the same defaults; both doors turn them into
    settings through training_settings, which completes, checks and resolves them."""
    from prefpersonalize.nodes.trainer import OPTIONAL_TRAINING_OPTIONS, TRAINING_OPTIONS
    from prefpersonalize.trainers.options import OPTIONS, training_settings

    assert {option.id: option.default for option in TRAINING_OPTIONS + OPTIONAL_TRAINING_OPTIONS} == OPTIONS
    settings = training_settings({"steps": 7, "save_every": 3, "training_dtype": "auto"}, torch.device("cpu"))
    assert settings.config.steps == 7 and settings.save_every == 3 and settings.config.dtype == torch.float32
    assert settings.config.beta == OPTIONS["beta"] and settings.config.lora_mode == OPTIONS["lora_mode"]
    for bad, message in [
        ({"timestep_start": 0.5, "timestep_end": 0.5}, "timestep_end .* must be above timestep_start"),
        ({"loss_mode": "ipo"}, "loss_mode 'ipo' is not one of dpo, patch_dpo"),
        ({"batch_size": 0}, "batch_size is 0; set it to at least 1"),
        ({"learning_speed": 1}, r"unknown training options \['learning_speed'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            training_settings(bad, torch.device("cpu"))


def test_bad_jobs_are_refused(tiny, tmp_path):
    import json

    from prefpersonalize.trainers.headless import check_process_count, load_job_model, load_job_pairs
    from prefpersonalize.trainers.jobs import job_from_json, read_job, write_job

    path, model, conditioning = tiny
    job_path = export(tiny, tmp_path / "job")
    with open(job_path, encoding="utf-8") as file:
        content = json.load(file)
    # Paths in the job folder are relative, so the folder can be moved; read and written back, it is the same.
    assert content["pairs"] == ["pairs.safetensors"] and content["output"]["directory"] == "."
    write_job(read_job(job_path), str(tmp_path / "copy.json"))
    with open(tmp_path / "copy.json", encoding="utf-8") as file:
        copied = json.load(file)
    assert copied == {
        **content,
        "pairs": ["job/pairs.safetensors"],
        "output": {**content["output"], "directory": "job"},
    }
    os.remove(tmp_path / "copy.json")
    with pytest.raises(ValueError, match="not a training job file"):
        job_from_json({**content, "format": "something else"}, str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown training options \['learning_speed'\]"):
        job_from_json({**content, "options": {"learning_speed": 1}}, str(tmp_path))
    with pytest.raises(ValueError, match="made for a SDXL model, but 'tiny_sd15.*' is a SD15 model"):
        load_job_model(job_from_json({**content, "base_family": "SDXL"}, str(tmp_path / "job")))
    with pytest.raises(ValueError, match="does not exist"):
        load_job_model(job_from_json({**content, "model": {"checkpoint": "missing.safetensors"}}, str(tmp_path)))
    with pytest.raises(ValueError, match="ComfyUI (cannot load|does not recognise) .*pairs.safetensors"):
        load_job_model(job_from_json({**content, "model": {"checkpoint": "pairs.safetensors"}}, str(tmp_path / "job")))

    export(tiny, tmp_path / "big", pairs=pair_set(conditioning, 2, size=(4, 16, 16)))
    mixed = read_job(job_path)
    mixed.pairs.append(str(tmp_path / "big" / "pairs.safetensors"))
    with pytest.raises(ValueError, match="different latent sizes"):
        load_job_pairs(mixed)
    pairs = pair_set(conditioning, 2)
    with pytest.raises(ValueError, match="3 processes, but the pair set has only 2 pairs"):
        check_process_count(3, pairs, batch_size=4)
    with pytest.raises(ValueError, match="batch_size 1 is split across the 2 processes"):
        check_process_count(2, pairs, batch_size=1)

    nan_pairs = pair_set(conditioning, 2)
    nan_pairs.winners[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export(tiny, tmp_path / "nan", pairs=nan_pairs)
    assert sorted(os.listdir(tmp_path)) == ["big", "job"]  # nothing half-written

    # The command: a clear message and a failing exit code, on every process.
    one_pair = export(tiny, tmp_path / "small", pairs=pair_set(conditioning, 1))
    code, output = train(one_pair, processes=2)
    assert code != 0 and "2 processes, but the pair set has only 1 pairs" in output, output
    assert "training stopped" in output
    assert sorted(os.listdir(tmp_path / "small")) == ["job.json", "pairs.json", "pairs.safetensors"]
