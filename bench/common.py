"""Shared benchmark plumbing: peak-memory measurement, loading ComfyUI and the pack in a
worker process, and running one worker subprocess per device."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "dev"))

import harness  # noqa: E402


class PeakMemory:
    """Peak memory a block adds over what was in use when it started, in MiB (CPU: peak RSS,
    reset through /proc/self/clear_refs after malloc_trim; CUDA: max_memory_allocated)."""

    def __init__(self, device: str):
        self.device = device
        self.added_mib = 0.0

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
                handle.write("5")
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.added_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.added_mib = (self._status("VmHWM") - self.start) / 2**20

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")


def load_comfyui(device: str) -> str:
    """Put ComfyUI and the pack (as package ``prefpersonalize``, without its ComfyUI entry point) on the
    path, select the device, and return ComfyUI's path. Call once, in a worker process."""
    from harness.comfy_server import comfyui_path

    comfyui = comfyui_path()
    sys.path.insert(0, comfyui)
    harness.register_pack()
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = device == "cpu"
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    return comfyui


def software() -> str:
    """The running ComfyUI's and PyTorch's versions, for a report (after ``load_comfyui``)."""
    import comfyui_version
    import torch

    return f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}"


DEFAULT_CHECKPOINT_CACHE = os.path.join(REPO_ROOT, ".cache", "checkpoints")


def tiny_checkpoint(comfyui: str, cache: str = DEFAULT_CHECKPOINT_CACHE) -> str:
    """The tiny SD1.5 checkpoint in ``cache``, built there on first use (``comfyui``: ComfyUI's
    path from ``load_comfyui``)."""
    from harness.tiny_checkpoint import ensure_checkpoint

    return ensure_checkpoint(comfyui, cache)


# ``--model`` choices: the tiny SD1.5 checkpoint (or ``--checkpoint``) and the tiny DiTs of
# ``harness.tiny_dit`` (random weights; the real families' block layout, Flux at its full 3072 width).
MODELS = ("sd15", "sd3", "flux")
DIT_MODELS = ("sd3", "flux")


def family_models() -> tuple[str, ...]:
    """The 2026 families' tiny DiTs (``harness.dit_families``), which the trainer's benchmark
    also takes as ``--model``."""
    from harness.dit_families import FAMILY_KINDS

    return FAMILY_KINDS


def add_model_options(parser: argparse.ArgumentParser, families: bool = False) -> None:
    """``--model`` (sd15, sd3 or flux, plus the 2026 families with ``families``) and ``--tokens``
    (the DiTs' text tokens)."""
    choices = MODELS + (family_models() if families else ())
    parser.add_argument(
        "--model",
        choices=choices,
        default="sd15",
        help="sd15: an SD1.x checkpoint (the tiny one unless named); the others: the tiny random-weight DiT "
        "(Load Diffusion Model) with CONDITIONING made as tensors",
    )
    parser.add_argument(
        "--tokens", type=int, default=16, help="DiTs: text tokens of the conditioning (stock: SD3 77, Flux 256+)"
    )
    for action in parser._actions:
        if action.dest == "checkpoint":
            action.help = "an SD1.x checkpoint, or with a DiT --model a diffusion-model file (default: the tiny one)"


def tiny_dit(comfyui: str, kind: str, cache: str = DEFAULT_CHECKPOINT_CACHE, path: str | None = None):
    """(MODEL, file name) of the tiny ``kind`` DiT in ``cache`` (built there on first use), or of
    the diffusion-model file ``path``, loaded as ComfyUI's Load Diffusion Model does."""
    import comfy.sd

    from harness.tiny_dit import ensure_dit

    path = path or ensure_dit(comfyui, cache, kind)
    return comfy.sd.load_diffusion_model(path), os.path.basename(path)


def tiny_taesd(comfyui: str, kind: str, cache: str = DEFAULT_CHECKPOINT_CACHE):
    """The ``kind`` family's TAESD VAE (taesd3, taef1, taef2, taesdxl; random weights, built in
    ``cache`` on first use) through the stock VAELoader."""
    import folder_paths
    import nodes

    from harness.tiny_dit import ensure_taesd, taesd_name

    folder_paths.add_model_folder_path("vae_approx", ensure_taesd(comfyui, cache, kind))
    return nodes.VAELoader().load_vae(taesd_name(kind))[0]


def dit_conditioning(kind: str, tokens: int, seed: int = 0) -> list:
    """CONDITIONING for a ``kind`` DiT of the stock encoders' shapes (Flux: guidance 3.5 in it)."""
    from harness.tiny_dit import dit_conditioning as make

    return make(kind, tokens=tokens, seed=seed)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--size``, ``--steps``, ``--checkpoint``, ``--devices``
    (and the internal ``--worker``); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image width and height (px)")
    parser.add_argument("--steps", type=int, default=6, help="sampling or timed training steps")
    parser.add_argument("--checkpoint", default=None, help="an SD1.x checkpoint (default: the tiny one)")
    parser.add_argument("--cache", default=DEFAULT_CHECKPOINT_CACHE, help="where the tiny checkpoint is built")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda when available)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def bench_main(script: str, parse_args, worker, report, argv=None) -> int:
    """A benchmark's entry point: as ``--worker DEVICE`` run ``worker(args)`` and print its
    result; otherwise run one worker per device and print ``report(result, args)``."""
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    return 1 if run_per_device(script, forwarded, args.devices, lambda result: report(result, args)) else 0


def run_per_device(script: str, argv: list[str], devices: str | None, report) -> list[str]:
    """Run ``script --worker DEVICE`` for CPU (and CUDA when available) and print ``report``
    of each worker's ``RESULT {json}`` line. Returns the devices whose worker failed."""
    chosen = devices.split(",") if devices else ["cpu"]
    if devices is None:
        import torch

        if torch.cuda.is_available():
            chosen.append("cuda")
    failed = []
    for device in chosen:
        process = subprocess.run(
            [sys.executable, os.path.abspath(script), *argv, "--worker", device], capture_output=True, text=True
        )
        results = [line[len("RESULT ") :] for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0 or not results:
            print(f"[{device}] failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
            failed.append(device)
            continue
        print(report(json.loads(results[0])))
        print()
    return failed
