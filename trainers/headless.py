"""The headless DPO trainer: a training job (pair sets, a model file, the trainer node's options)
run outside the graph, in one process or data-parallel on N processes under ``accelerate launch``.

It is the node's training through the same door: the options become settings in
``options.training_settings``, the loop is ``loop.train_dpo_lora`` and ``progress.TrainingProgress``
reports (log lines here, where the node has its progress bar). Every process loads the model and
the pairs, draws the same global micro-batches from the job's seed and computes its share of each
(``loop.DataParallel``); accelerate averages the LoRA's gradients, so N processes train the LoRA
one process would with the same batch_size. The main process writes checkpoints, the LoRA and the
training plot, each atomically. The job file is ``trainers/jobs.py``'s, the command
``tools/train_dpo.py``; docs: README, section 'Training on several GPUs'.
"""

from __future__ import annotations

import logging
import os

import comfy.sd
import comfy.utils
from PIL import Image

from ..pure.drawing import training_plot
from ..pure.errors import InputError
from ..pure.files import unused_stem, write_atomically
from ..pure.pairs import PreferencePairs, load_pairs, merge_pairs
from .jobs import TrainingJob
from .loop import DataParallel, train_dpo_lora, training_metadata
from .lora_files import LoraWithMetadata, base_family, save_lora
from .options import training_settings
from .progress import TrainingProgress
from .training_state import read_state, state_path, write_state

CHECKPOINT_LINE = "saved LoRA checkpoint: "  # tools/train_dpo.py reports the last one if a process fails
LOG_EVERY = 10


def load_job_pairs(job: TrainingJob) -> PreferencePairs:
    """The job's pair sets, merged (one latent size and VAE family)."""
    pairs = None
    for path in job.pairs:
        loaded = load_pairs(path)
        pairs = loaded if pairs is None else merge_pairs(pairs, loaded)
    return pairs


def load_job_model(job: TrainingJob):
    """The job's model with ComfyUI's loaders; refused when it is not the family the job names."""
    kind, path = next(iter(job.model.items()))
    if not os.path.isfile(path):
        raise InputError(f"the job's {kind.replace('_', ' ')} file '{path}' does not exist")
    try:
        if kind == "checkpoint":
            model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
        else:
            model = comfy.sd.load_diffusion_model(path)
    except RuntimeError as error:  # ComfyUI's "Could not detect model type" and unreadable files
        raise InputError(f"ComfyUI cannot load '{path}' as a {kind.replace('_', ' ')}: {error}") from error
    if model is None:
        raise InputError(f"ComfyUI does not recognise '{path}' as a {kind.replace('_', ' ')}")
    found = base_family(model)
    if job.base_family and found != job.base_family:
        raise InputError(
            f"the job was made for a {job.base_family} model, but '{os.path.basename(path)}' is a {found} model; "
            f"point the job at the {job.base_family} file it was made for"
        )
    return model


def check_process_count(processes: int, pairs: PreferencePairs, batch_size: int) -> None:
    if processes > len(pairs):
        raise InputError(
            f"{processes} processes, but the pair set has only {len(pairs)} pairs: every process needs a pair "
            f"of each batch; run at most {len(pairs)} processes"
        )
    if processes > batch_size:
        raise InputError(
            f"batch_size {batch_size} is split across the {processes} processes; set batch_size to at least "
            f"{processes} (a multiple of {processes} splits evenly)"
        )


def run_job(job: TrainingJob, accelerator) -> dict[str, str]:
    """Train ``job`` as this process's part of ``accelerator``'s processes; returns the paths the
    main process wrote (``lora``, ``plot``)."""
    parallel = DataParallel(
        accelerator.process_index, accelerator.num_processes, lambda tensor: accelerator.reduce(tensor, "mean")
    )
    main = accelerator.is_main_process
    logging.info("process %d of %d (pid %d) on %s", parallel.rank, parallel.processes, os.getpid(), accelerator.device)
    pairs = load_job_pairs(job)
    check_process_count(parallel.processes, pairs, job.options["batch_size"])  # before the costly load
    model = load_job_model(job)
    settings = training_settings(job.options, model.load_device, model.model.get_dtype())
    config = settings.config
    resume = comfy.utils.load_torch_file(job.resume_lora) if job.resume_lora else None
    state = read_state(job.resume_state) if job.resume_state else None

    def save(lora, step, stem):
        tensors = LoraWithMetadata(
            lora.state_dict(), training_metadata(config, pairs, model, step, processes=parallel.processes)
        )
        path = os.path.join(job.output_dir, f"{unused_stem(job.output_dir, stem)}.safetensors")
        return save_lora(tensors, path, model, job.layout)

    def save_checkpoint(lora, step, stem):
        path = save(lora, step, stem)
        print(CHECKPOINT_LINE + path, flush=True)
        return path

    # The main process reports and saves; the final LoRA is written below, so no checkpoint at the last step.
    progress = TrainingProgress(
        config.steps,
        name=job.name,
        save=save_checkpoint,
        save_every=settings.save_every,
        checkpoint_last=False,
        log_every=LOG_EVERY,
    )
    result = train_dpo_lora(
        model, pairs, config, resume=resume, state=state, progress=progress if main else None, parallel=parallel
    )
    written = {}
    if main:
        written["lora"] = save(result.lora, result.steps_done, job.name)
        written["state"] = write_state(result.state, state_path(written["lora"]))
        plot = Image.fromarray((training_plot(result.history).numpy() * 255).astype("uint8"))
        plot_path = os.path.join(job.output_dir, f"{unused_stem(job.output_dir, job.name + '_plot', '.png')}.png")
        written["plot"] = write_atomically(plot_path, lambda temporary: plot.save(temporary, format="PNG"))
        print("\n".join(f"saved {what}: {path}" for what, path in written.items()), flush=True)
    accelerator.wait_for_everyone()
    return written
