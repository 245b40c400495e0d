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
    run(TrainingProgress(3, show=lambda step, history, lora: shown.append((step, len(history["loss"])))), 3)
    assert shown == [(1, 1), (2, 2), (3, 3)]


def test_the_last_good_lora_is_saved_on_cancel():
    saved, save = recorder()
    progress = TrainingProgress(10, name="run", save=save)
    assert progress.save_last_good_lora() is None  # cancelled before the first step: nothing to save
    run(progress, 10, stop_at=3)
    assert progress.save_last_good_lora() == "run_interrupted_step00003.safetensors"
    assert saved == [("lora after 3", 3, "run_interrupted_step00003")]


def test_a_resumed_run_counts_on_and_writes_the_state_beside_each_checkpoint(tmp_path):
    import torch

    from prefpersonalize.trainers.training_state import TrainingState, read_state

    def save(lora, step, stem):
        path = tmp_path / f"{stem}.safetensors"
        path.write_bytes(b"lora")
        return str(path)

    def state():
        return TrainingState(
            lora={"layer.lora_up.weight": torch.ones(2, 1)},
            optimizer={"layer.lora_up.weight": {"exp_avg": torch.zeros(2, 1), "step": torch.tensor(7.0)}},
            steps_done=7,
            generator=torch.Generator().manual_seed(1).get_state(),
            adaptive_mean=None,
            grad_scaler=None,
            options={"rank": 4},
            model="abc",
        )

    progress = TrainingProgress(4, name="run", save=save, save_every=2)
    progress.start(steps_before=5)
    for step in range(1, 5):
        progress.after_step(step, METRICS, "lora", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run_step00007.safetensors",
        "run_step00007.state.safetensors",
        "run_step00009.safetensors",
        "run_step00009.state.safetensors",
    ]
    written = read_state(str(tmp_path / "run_step00007.state.safetensors"))
    assert written.steps_done == 7 and written.options == {"rank": 4} and written.model == "abc"
    assert torch.equal(written.optimizer["layer.lora_up.weight"]["step"], torch.tensor(7.0))
