"""The training progress reporter both doors to the trainer use: checkpoints, log lines, the
node's ``show`` and the last good LoRA on Cancel."""

import logging

import pytest

from prefpersonalize.trainers.progress import TrainingProgress

METRICS = {"loss": 0.5, "accuracy": 1.0, "margin": 0.25}


def run(progress, steps, stop_at=None):
    for step in range(1, steps + 1):
        progress.after_step(step, METRICS, f"lora after {step}")
        if step == stop_at:
            return


def recorder():
    saved = []

    def save(lora, step, stem):
        saved.append((lora, step, stem))
        return f"{stem}.safetensors"

    return saved, save


@pytest.mark.parametrize(("checkpoint_last", "expected"), [(True, [2, 4]), (False, [2])])
def test_checkpoints_every_save_every_steps(checkpoint_last, expected):
    saved, save = recorder()
    run(TrainingProgress(4, name="run", save=save, save_every=2, checkpoint_last=checkpoint_last), 4)
    assert saved == [(f"lora after {step}", step, f"run_step{step:05d}") for step in expected]


def test_no_checkpoints_without_save_every():
    saved, save = recorder()
    run(TrainingProgress(4, save=save), 4)
    assert saved == []


def test_log_lines_on_the_first_last_and_every_log_every_step(caplog):
    with caplog.at_level(logging.INFO):
        run(TrainingProgress(7, name="run", log_every=3), 7)
    steps = [message.split(" ")[2] for message in caplog.messages]
    assert steps == ["1/7", "3/7", "6/7", "7/7"]
    assert caplog.messages[0] == "run: step 1/7 loss 0.5000 accuracy 1.00 margin 0.250"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(TrainingProgress(1, name="run", label="DPO LoRA Trainer"), 1)
    assert caplog.messages == ["DPO LoRA Trainer: step 1/1 loss 0.5000 accuracy 1.00 margin 0.250"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(TrainingProgress(7, log_every=0), 7)
    assert caplog.messages == []


def test_show_sees_every_step_with_the_history():
    shown = []
    run(TrainingProgress(3, show=lambda step, history: shown.append((step, len(history["loss"])))), 3)
    assert shown == [(1, 1), (2, 2), (3, 3)]


def test_the_last_good_lora_is_saved_on_cancel():
    saved, save = recorder()
    progress = TrainingProgress(10, name="run", save=save)
    assert progress.save_last_good_lora() is None  # cancelled before the first step: nothing to save
    run(progress, 10, stop_at=3)
    assert progress.save_last_good_lora() == "run_interrupted_step00003.safetensors"
    assert saved == [("lora after 3", 3, "run_interrupted_step00003")]
