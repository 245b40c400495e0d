"""Training jobs: the JSON job file the headless trainer reads (pair sets, a model file, the
trainer's options, where the LoRA goes), and the job folder Export Training Job writes. The
command line that reads one is ``tools/train_dpo.py``; the run is ``trainers/headless.py``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from ..pure.errors import InputError
from ..pure.files import sanitize_file_stem, write_atomically
from ..pure.pairs import PreferencePairs, save_pairs
from .lora_files import LORA_LAYOUTS, base_family
from .options import check_options

JOB_FORMAT = "prefpersonalize-training-job"
JOB_VERSION = 1
MODEL_KINDS = ("checkpoint", "diffusion_model")  # CheckpointLoaderSimple's and UNETLoader's files


@dataclass
class TrainingJob:
    """A training run's inputs; paths are absolute."""

    pairs: list[str]
    model: dict[str, str]  # one of MODEL_KINDS -> file
    options: dict = field(default_factory=dict)  # the trainer's options (trainers.options.OPTIONS)
    base_family: str | None = None  # what the job was made for (checked against the model file)
    output_dir: str = "."
    name: str = "dpo_lora"
    layout: str = "kohya"
    resume_lora: str | None = None
    resume_state: str | None = None  # a training state (training_state.py) to continue

    def to_json(self, relative_to: str) -> dict:
        """The job file's content, with paths relative to ``relative_to`` (the job's folder)
        where they lie in it, so a job folder can be copied to a cluster as it is."""
        folder = os.path.abspath(relative_to)

        def rel(path):
            path = os.path.abspath(path)
            inside = path == folder or path.startswith(folder + os.sep)
            return os.path.relpath(path, folder) if inside else path

        return {
            "format": JOB_FORMAT,
            "version": JOB_VERSION,
            "pairs": [rel(path) for path in self.pairs],
            "model": {kind: rel(path) for kind, path in self.model.items()},
            "base_family": self.base_family,
            "options": self.options,
            "output": {"directory": rel(self.output_dir), "name": self.name, "layout": self.layout},
            "resume_lora": rel(self.resume_lora) if self.resume_lora else None,
            "resume_state": rel(self.resume_state) if self.resume_state else None,
        }


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
        resume_state=path(content["resume_state"]) if content.get("resume_state") else None,
    )


def read_job(path: str) -> TrainingJob:
    """The job in the file at ``path``."""
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the job file '{path}': {error}") from error
    return job_from_json(content, os.path.dirname(os.path.abspath(path)))


def write_job(job: TrainingJob, path: str) -> str:
    """Write ``job`` to ``path`` atomically, paths in its folder relative to it; returns ``path``."""
    text = json.dumps(job.to_json(os.path.dirname(os.path.abspath(path))), indent=2)

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)

    return write_atomically(path, write)


def export_job(
    pairs: PreferencePairs, model_patcher, folder: str, *, model_kind: str, model_path: str, options: dict, layout: str
) -> str:
    """Write a job folder for the headless trainer: the pairs and ``job.json`` (the LoRA will be
    written beside them). Built under a temporary name and renamed, so a failure leaves nothing;
    returns the job file's path."""
    if model_kind not in MODEL_KINDS:
        raise InputError(f"unknown model kind {model_kind!r}; one of {MODEL_KINDS}")
    job = TrainingJob(
        pairs=[],
        model={model_kind: os.path.abspath(model_path)},
        options=check_options(options),
        base_family=base_family(model_patcher),
        name=os.path.basename(folder),
        layout=layout,
    )
    temporary = f"{folder}.partial"
    os.makedirs(temporary)
    try:
        # Paths inside the temporary folder are written relative to it, so they hold after the rename.
        tensor_file, _ = save_pairs(pairs, os.path.join(temporary, "pairs"))
        job.pairs, job.output_dir = [tensor_file], temporary
        write_job(job, os.path.join(temporary, "job.json"))
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return os.path.join(folder, "job.json")
