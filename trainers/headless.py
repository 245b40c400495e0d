"""The headless DPO trainer: a training job (pair sets, a model file, the trainer node's options)
run outside the graph, in one process or data-parallel on N processes under ``accelerate launch``.

It runs the node's own training code (``trainer.train_dpo_lora``). Every process loads the model
and the pairs, draws the same global micro-batches from the job's seed and computes its share of
each (``trainer.DataParallel``); accelerate averages the LoRA's gradients, so N processes train
the LoRA one process would with the same batch_size. The main process writes checkpoints, the
LoRA and the training plot, each atomically. ``tools/train_dpo.py`` is the command; docs: README,
section 'Training on several GPUs'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import comfy.sd
import comfy.utils
import torch
from PIL import Image

from ..pure.drawing import training_plot
from ..pure.errors import InputError
from ..pure.files import sanitize_file_stem, unused_stem, write_atomically
from ..pure.pairs import PreferencePairs, load_pairs, merge_pairs, save_pairs
from .loop import DataParallel, DPOTrainingConfig, resolve_dtype, train_dpo_lora, training_metadata
from .lora_files import LORA_LAYOUTS, LoraWithMetadata, base_family, save_lora

JOB_FORMAT = "prefpersonalize-training-job"
JOB_VERSION = 1
MODEL_KINDS = ("checkpoint", "diffusion_model")  # CheckpointLoaderSimple's and UNETLoader's files
# The trainer node's options, by the node's input names, with DPOTrainingConfig's defaults.
NOT_OPTIONS = ("dtype", "focus_gate")  # training_dtype chooses dtype; the focus gate is not a node input
CONFIG_OPTIONS = {f.name: f.default for f in dataclasses.fields(DPOTrainingConfig) if f.name not in NOT_OPTIONS}
OPTIONS = {**CONFIG_OPTIONS, "training_dtype": "auto", "save_every": 0}
CHECKPOINT_LINE = "saved LoRA checkpoint: "  # tools/train_dpo.py reports the last one if a process fails
LOG_EVERY = 10


@dataclass
class TrainingJob:
    """A training run's inputs; paths are absolute."""

    pairs: list[str]
    model: dict[str, str]  # one of MODEL_KINDS -> file
    options: dict = field(default_factory=dict)
    base_family: str | None = None  # what the job was made for (checked against the model file)
    output_dir: str = "."
    name: str = "dpo_lora"
    layout: str = "kohya"
    resume_lora: str | None = None

    def to_json(self, relative_to: str) -> dict:
        """The job file's content, with paths relative to ``relative_to`` (the job's folder)
        where they lie below it, so a job folder can be copied to a cluster as it is."""

        def rel(path):
            inside = os.path.abspath(path).startswith(os.path.abspath(relative_to) + os.sep)
            return os.path.relpath(path, relative_to) if inside else path

        return {
            "format": JOB_FORMAT,
            "version": JOB_VERSION,
            "pairs": [rel(path) for path in self.pairs],
            "model": {kind: rel(path) for kind, path in self.model.items()},
            "base_family": self.base_family,
            "options": self.options,
            "output": {"directory": rel(self.output_dir), "name": self.name, "layout": self.layout},
            "resume_lora": rel(self.resume_lora) if self.resume_lora else None,
        }


def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown training options {unknown}; the options are {sorted(OPTIONS)}")
    return {**OPTIONS, **options}


def job_from_json(content: dict, folder: str) -> TrainingJob:
    """A ``TrainingJob`` from a job file's content; relative paths are read from ``folder``."""
    if content.get("format") != JOB_FORMAT:
        raise InputError(f"not a training job file (its 'format' is not {JOB_FORMAT!r})")
    if content.get("version", 0) > JOB_VERSION:
        raise InputError(f"the job file is version {content['version']}; this pack reads {JOB_VERSION}; update it")

    def path(value):
        return os.path.normpath(os.path.join(folder, value))

    model = content.get("model") or {}
    if len(model) != 1 or next(iter(model)) not in MODEL_KINDS:
        raise InputError(f"the job's 'model' must name one file, as one of {MODEL_KINDS}")
    pairs = content.get("pairs")
    pairs = [pairs] if isinstance(pairs, str) else list(pairs or [])
    if not pairs:
        raise InputError("the job names no pair set ('pairs')")
    output = content.get("output") or {}
    layout = output.get("layout", "kohya")
    if layout not in LORA_LAYOUTS:
        raise InputError(f"unknown LoRA layout {layout!r}; one of {', '.join(LORA_LAYOUTS)}")
    return TrainingJob(
        pairs=[path(p) for p in pairs],
        model={kind: path(file) for kind, file in model.items()},
        options=check_options(content.get("options") or {}),
        base_family=content.get("base_family"),
        output_dir=path(output.get("directory", ".")),
        name=sanitize_file_stem(output.get("name", "dpo_lora")) or "dpo_lora",
        layout=layout,
        resume_lora=path(content["resume_lora"]) if content.get("resume_lora") else None,
    )


def read_job(path: str) -> TrainingJob:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the job file '{path}': {error}") from error
    return job_from_json(content, os.path.dirname(os.path.abspath(path)))


def write_job(job: TrainingJob, path: str) -> str:
    text = json.dumps(job.to_json(os.path.dirname(os.path.abspath(path))), indent=2)

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)

    return write_atomically(path, write)


def argument_parser() -> argparse.ArgumentParser:
    """The command's flags: a job file, or its parts as flags (which override the file's)."""
    parser = argparse.ArgumentParser(description="Train a DPO LoRA from a saved pair set, outside the graph.")
    parser.add_argument("job", nargs="?", help="a job file (Export Training Job writes one)")
    parser.add_argument("--pairs", nargs="+", help="pair set files (.safetensors, with their .json beside)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="a checkpoint file (as CheckpointLoaderSimple loads)")
    model.add_argument("--diffusion-model", help="a diffusion model file (as UNETLoader loads)")
    parser.add_argument("--output", help="folder for the LoRA, its checkpoints and the plot")
    parser.add_argument("--name", help="file name of the LoRA")
    parser.add_argument("--layout", choices=LORA_LAYOUTS)
    parser.add_argument("--resume-lora", help="a LoRA file to continue (kohya, diffusers or ComfyUI layout)")
    options = parser.add_argument_group("training options (the DPO LoRA Trainer's inputs)")
    for name, default in OPTIONS.items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        options.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    return parser


def job_from_args(argv: list[str]) -> TrainingJob:
    args = argument_parser().parse_args(argv)
    if args.job:
        job = read_job(args.job)
    else:
        if not args.pairs or not (args.checkpoint or args.diffusion_model):
            raise InputError("give a job file, or --pairs and --checkpoint or --diffusion-model")
        job = TrainingJob(pairs=[], model={}, options=dict(OPTIONS))
    if args.pairs:
        job.pairs = [os.path.abspath(p) for p in args.pairs]
    if args.checkpoint or args.diffusion_model:
        kind = "checkpoint" if args.checkpoint else "diffusion_model"
        job.model = {kind: os.path.abspath(args.checkpoint or args.diffusion_model)}
    if args.output:
        job.output_dir = os.path.abspath(args.output)
    if args.resume_lora:
        job.resume_lora = os.path.abspath(args.resume_lora)
    job.name, job.layout = args.name or job.name, args.layout or job.layout
    given = {name: value for name, value in vars(args).items() if name in OPTIONS and value is not None}
    job.options = check_options({**job.options, **given})
    return job


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


def config_from_options(options: dict, device: torch.device) -> DPOTrainingConfig:
    values = {name: options[name] for name in CONFIG_OPTIONS}
    return DPOTrainingConfig(**values, dtype=resolve_dtype(options["training_dtype"], device))


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
    config = config_from_options(job.options, model.load_device)
    resume = comfy.utils.load_torch_file(job.resume_lora) if job.resume_lora else None

    def labelled(lora, step):
        metadata = {**training_metadata(config, pairs, model, step), "prefp_processes": str(parallel.processes)}
        return LoraWithMetadata(lora.state_dict(), metadata)

    def save(tensors, stem):
        path = os.path.join(job.output_dir, f"{unused_stem(job.output_dir, stem)}.safetensors")
        return save_lora(tensors, path, model, job.layout)

    save_every = job.options["save_every"]

    def on_step(step, metrics, lora):
        if not main:
            return
        if step == 1 or step % LOG_EVERY == 0 or step == config.steps:
            logging.info("step %d/%d loss %.4f accuracy %.2f", step, config.steps, metrics["loss"], metrics["accuracy"])
        if save_every and step % save_every == 0 and step < config.steps:
            print(CHECKPOINT_LINE + save(labelled(lora, step), f"{job.name}_step{step:05d}"), flush=True)

    result = train_dpo_lora(model, pairs, config, resume=resume, on_step=on_step, parallel=parallel)
    written = {}
    if main:
        written["lora"] = save(labelled(result.lora, result.steps_done), job.name)
        plot = Image.fromarray((training_plot(result.history).numpy() * 255).astype("uint8"))
        plot_path = os.path.join(job.output_dir, f"{unused_stem(job.output_dir, job.name + '_plot', '.png')}.png")
        written["plot"] = write_atomically(plot_path, lambda temporary: plot.save(temporary, format="PNG"))
        print(f"saved LoRA: {written['lora']}\nsaved plot: {written['plot']}", flush=True)
    accelerator.wait_for_everyone()
    return written


def export_job(
    pairs: PreferencePairs, model_patcher, model_kind: str, model_path: str, options: dict, folder: str, layout: str
) -> str:
    """Write a job folder for the headless trainer: the pairs and ``job.json`` (the LoRA will be
    written beside them). Built under a temporary name and renamed, so a failure leaves nothing;
    returns the job file's path."""
    if model_kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {model_kind!r}; one of {MODEL_KINDS}")
    temporary = f"{folder}.partial"
    os.makedirs(temporary)
    try:
        save_pairs(pairs, os.path.join(temporary, "pairs"))
        job = TrainingJob(
            pairs=[os.path.join(folder, "pairs.safetensors")],
            model={model_kind: os.path.abspath(model_path)},
            options=check_options(options),
            base_family=base_family(model_patcher),
            output_dir=folder,
            name=os.path.basename(folder),
            layout=layout,
        )
        content = json.dumps(job.to_json(folder), indent=2)
        with open(os.path.join(temporary, "job.json"), "w", encoding="utf-8") as file:
            file.write(content)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return os.path.join(folder, "job.json")
