"""Train a DPO LoRA outside the graph, from a saved pair set: on one process, or data-parallel
on N processes (GPUs, or CPU processes) through accelerate.

    python tools/train_dpo.py JOB.json                        # one process
    python tools/train_dpo.py JOB.json --processes 4          # 4 processes via accelerate launch
    accelerate launch --num_processes 4 tools/train_dpo.py JOB.json

A job file comes from the Export Training Job node; flags (``--help``) give or override its parts.
With ``--processes`` this command starts ``accelerate launch`` itself and, if a process fails or
is killed, says so and names the last LoRA checkpoint written. This file is the command line
alone: the job file is ``trainers/jobs.py``'s, the run ``trainers/headless.py``'s, with the DPO
LoRA Trainer node's options (``trainers/options.py``) and training loop.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "prefpersonalize"
WORKER_ENV = "PREFP_TRAIN_WORKER"  # set in the processes this command launches


def register_pack() -> None:
    """Make the pack importable in this process as ``prefpersonalize`` (``prefpersonalize.trainers``,
    ...) without running its ``__init__.py``, which registers nodes in a running ComfyUI; the
    modules' relative imports then work as they do inside ComfyUI. The tests' harness uses it too."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [PACK_ROOT]
    sys.modules[PACKAGE] = package


def own_flags(argv):
    parser = argparse.ArgumentParser(add_help=False)
    installed_in = os.path.dirname(os.path.dirname(PACK_ROOT))  # ComfyUI/custom_nodes/<this pack>
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or installed_in)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU")
    return parser.parse_known_args(argv)


def pack_module(name: str):
    """A module of the pack (``trainers.jobs``), once ``register_pack`` ran and ComfyUI is on the path."""
    return importlib.import_module(f"{PACKAGE}.{name}")


def job_parser() -> argparse.ArgumentParser:
    """The job's flags: a job file, or its parts as flags (which override the file's)."""
    layouts = pack_module("trainers.lora_files").LORA_LAYOUTS
    parser = argparse.ArgumentParser(description="Train a DPO LoRA from a saved pair set, outside the graph.")
    parser.add_argument("job", nargs="?", help="a job file (Export Training Job writes one)")
    parser.add_argument("--pairs", nargs="+", help="pair set files (.safetensors, with their .json beside)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="a checkpoint file (as CheckpointLoaderSimple loads)")
    model.add_argument("--diffusion-model", help="a diffusion model file (as UNETLoader loads)")
    parser.add_argument("--output", help="folder for the LoRA, its checkpoints and the plot")
    parser.add_argument("--name", help="file name of the LoRA")
    parser.add_argument("--layout", choices=layouts)
    parser.add_argument("--resume-lora", help="a LoRA file to continue (kohya, diffusers or ComfyUI layout)")
    parser.add_argument(
        "--resume-state", help="a training state (<checkpoint>.state.safetensors) to continue exactly where it stopped"
    )
    options = parser.add_argument_group("training options (the DPO LoRA Trainer's inputs)")
    for name, default in pack_module("trainers.options").OPTIONS.items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        options.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    return parser


def job_from_args(argv: list[str]):
    """The ``TrainingJob`` the command line names: a job file, its parts as flags, or both."""
    jobs, options = pack_module("trainers.jobs"), pack_module("trainers.options")
    args = job_parser().parse_args(argv)
    if args.job:
        job = jobs.read_job(args.job)
    elif not args.pairs or not (args.checkpoint or args.diffusion_model):
        raise pack_module("pure.errors").InputError("give a job file, or --pairs and --checkpoint or --diffusion-model")
    else:
        job = jobs.TrainingJob(pairs=[], model={})
    if args.pairs:
        job.pairs = [os.path.abspath(p) for p in args.pairs]
    if args.checkpoint or args.diffusion_model:
        kind = "checkpoint" if args.checkpoint else "diffusion_model"
        job.model = {kind: os.path.abspath(args.checkpoint or args.diffusion_model)}
    if args.output:
        job.output_dir = os.path.abspath(args.output)
    if args.resume_lora:
        job.resume_lora = os.path.abspath(args.resume_lora)
    if args.resume_state:
        job.resume_state = os.path.abspath(args.resume_state)
    job.name, job.layout = args.name or job.name, args.layout or job.layout
    given = {name: value for name, value in vars(args).items() if name in options.OPTIONS and value is not None}
    job.options = options.check_options({**job.options, **given})
    return job


def launch(processes: int, cpu: bool, argv: list[str]) -> int:
    """Run this command on ``processes`` processes with ``accelerate launch``; report a failure."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # accelerate's multi-process launcher (torch.distributed.run), for CPU processes too: there
    # the workers' Accelerator(cpu=True) joins a gloo group. accelerate's own --cpu would start
    # one process without MPI.
    command += ["--multi_gpu"] if processes > 1 else []
    command += [os.path.abspath(__file__), *argv] + (["--cpu"] if cpu else [])
    last_checkpoint = None
    with subprocess.Popen(command, env={**os.environ, WORKER_ENV: "1"}, stdout=subprocess.PIPE, text=True) as run:
        for line in run.stdout:
            print(line, end="", flush=True)
            if line.startswith("saved LoRA checkpoint: "):  # headless.CHECKPOINT_LINE
                last_checkpoint = line.split(": ", 1)[1].strip()
    if run.returncode != 0:
        saved = (
            f"The last LoRA checkpoint is {last_checkpoint}."
            if last_checkpoint
            else ("No LoRA checkpoint was saved (save_every sets how often one is).")
        )
        print(
            f"train_dpo: training stopped: a training process failed or was killed (accelerate launch exited with "
            f"{run.returncode}; its error is above). {saved}",
            file=sys.stderr,
        )
    return run.returncode


def train(comfyui: str, cpu: bool, argv: list[str]) -> int:
    from accelerate import Accelerator

    # A SIGTERM (the launcher stopping the others when one process fails) exits through Python,
    # so a file being written is removed rather than left half-written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    accelerator = Accelerator(cpu=cpu)
    if accelerator.device.type == "cuda":
        import torch

        torch.cuda.set_device(accelerator.device)  # ComfyUI takes the current device
    if not os.path.isdir(os.path.join(comfyui, "comfy")):
        print(f"train_dpo: no ComfyUI at {comfyui}; pass --comfyui or set COMFYUI_PATH", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.abspath(comfyui))
    from comfy.cli_args import args

    args.cpu = accelerator.device.type == "cpu"
    register_pack()
    errors = pack_module("pure.errors")
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{accelerator.process_index}] %(message)s", force=True)
    try:
        pack_module("trainers.headless").run_job(job_from_args(argv), accelerator)
    except errors.InputError as error:
        print(f"train_dpo: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    flags, rest = own_flags(argv)
    if flags.processes is not None and not os.environ.get(WORKER_ENV):
        return launch(flags.processes, flags.cpu, [*rest, "--comfyui", flags.comfyui])
    return train(flags.comfyui, flags.cpu, rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
