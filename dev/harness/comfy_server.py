"""Start a real ComfyUI server with this pack, queue graphs over HTTP, read results, stop it.

Used by the integration tests, the browser tests and ``make demo``. The server gets a private
``--base-directory`` (models/, custom_nodes/, input/, output/, user/) with the pack linked into
``custom_nodes/`` and generated tiny checkpoints under every checkpoint name asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from . import REPO_ROOT
from .tiny_checkpoint import ensure_checkpoint
from .tiny_dit import (
    FULL_TEXT_ENCODERS,
    TAESD_NAMES,
    ensure_dit,
    ensure_full_text_encoder,
    ensure_taesd,
    taesd_file_names,
)
from .tiny_vae import ensure_dit_checkpoint, ensure_vae

PACK_FOLDER_NAME = "ComfyUI-PrefPersonalize"
DEFAULT_CACHE = os.path.join(REPO_ROOT, ".cache")
# Text encoders by what they are -> the generated file that is one (the SDXL ones are the same models).
TEXT_ENCODER_KINDS = {"clip_l": "sdxl_clip_l", "clip_g": "sdxl_clip_g"}


def comfyui_path() -> str:
    """The ComfyUI source tree: ``$COMFYUI_PATH`` or the one ``make`` unpacked into ``.comfyui``."""
    path = os.environ.get("COMFYUI_PATH") or os.path.join(REPO_ROOT, ".comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"No ComfyUI at {path}; run 'make env' (or set COMFYUI_PATH).")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PromptError(RuntimeError):
    """A prompt the server rejected (HTTP 400) or whose execution failed."""

    def __init__(self, message: str, payload: dict):
        super().__init__(message)
        self.payload = payload


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with its own base directory.

    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        base_directory: str | None = None,
        port: int | None = None,
        cache_dir: str = DEFAULT_CACHE,
        log_path: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.extra_args = extra_args  # more of ComfyUI's command-line options
        self._own_base = base_directory is None
        self.base_directory = base_directory or tempfile.mkdtemp(prefix="comfy-base-")
        self.port = port or free_port()
        self.cache_dir = cache_dir
        self.log_path = log_path or os.path.join(self.base_directory, "server.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------
    def prepare(self) -> None:
        for folder in ("custom_nodes", "models/checkpoints", "input", "output", "user", "temp"):
            os.makedirs(os.path.join(self.base_directory, folder), exist_ok=True)
        settings = os.path.join(self.base_directory, "user", "default", "comfy.settings.json")
        if not os.path.exists(settings):
            # A fresh user gets the template browser on first load; it would cover screenshots.
            os.makedirs(os.path.dirname(settings), exist_ok=True)
            with open(settings, "w", encoding="utf-8") as handle:
                json.dump({"Comfy.TutorialCompleted": True}, handle)
        link = os.path.join(self.base_directory, "custom_nodes", PACK_FOLDER_NAME)
        if not os.path.lexists(link):
            os.symlink(REPO_ROOT, link)

    def provide_model(self, folder: str, name: str, source: str) -> str:
        """Serve the file ``source`` under ``name`` in models/``folder``/ (a symbolic link)."""
        target = os.path.join(self.base_directory, "models", folder, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(source, target)
        return target

    def provide_checkpoint(self, name: str, seed: int = 0) -> str:
        """Serve the tiny generated checkpoint under ``name`` in models/checkpoints/."""
        source = ensure_checkpoint(comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), seed)
        return self.provide_model("checkpoints", name, source)

    def provide_dit(self, kind: str, name: str, seed: int = 0) -> str:
        """Serve the tiny ``kind`` DiT (``sd3``, ``flux``) under ``name`` in models/diffusion_models/."""
        source = ensure_dit(comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), kind, seed)
        return self.provide_model("diffusion_models", name, source)

    def provide_dit_checkpoint(self, kind: str, name: str, seed: int = 0) -> str:
        """Serve the tiny ``kind`` DiT with a 16-channel VAE as one checkpoint under ``name`` in
        models/checkpoints/ (as SD3.5 ships), for CheckpointLoaderSimple."""
        source = ensure_dit_checkpoint(comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), kind, seed)
        return self.provide_model("checkpoints", name, source)

    def provide_vae(self, kind: str, name: str, seed: int = 0) -> str:
        """Serve a random KL VAE (``harness.tiny_vae.VAES``: ``kl_vae16`` for Flux.1 / SD3.5,
        ``flux2_vae``; full size) under ``name`` in models/vae/."""
        source = ensure_vae(comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), kind, seed)
        return self.provide_model("vae", name, source)

    def provide_text_encoder(self, kind: str, name: str) -> str:
        """Serve a random text encoder (``clip_l``, ``clip_g``; ``t5xxl``, ``qwen3_4b`` in fp8; full
        size, as their configs are fixed) under ``name`` in models/text_encoders/, for CLIPLoader /
        DualCLIPLoader."""
        cache = os.path.join(self.cache_dir, "checkpoints")
        if kind in FULL_TEXT_ENCODERS:
            source = ensure_full_text_encoder(comfyui_path(), cache, kind)
        else:
            source = ensure_checkpoint(comfyui_path(), cache, kind=TEXT_ENCODER_KINDS[kind])
        return self.provide_model("text_encoders", name, source)

    def provide_taesd(self, kind: str) -> str:
        """Serve random TAESD3 / TAEF1 files in models/vae_approx/: VAELoader then offers
        ``taesd3`` / ``taef1`` (16-channel latents)."""
        folder = ensure_taesd(comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), kind)
        for name in taesd_file_names(kind):
            self.provide_model("vae_approx", name, os.path.join(folder, name))
        return TAESD_NAMES[kind]

    def provide_clip_vision(self, name: str, seed: int = 0) -> str:
        """Serve a random CLIP ViT-L/14 vision model under ``name`` in models/clip_vision/."""
        source = ensure_checkpoint(
            comfyui_path(), os.path.join(self.cache_dir, "checkpoints"), seed, kind="clip_vision"
        )
        return self.provide_model("clip_vision", name, source)

    def start(self, timeout: float = 240.0) -> ComfyServer:
        self.prepare()
        command = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            self.base_directory,
            "--disable-auto-launch",
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, cwd=comfyui_path(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_directory, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def assert_serving(self, node: str) -> None:
        """The server still answers, still knows ``node`` and runs nothing: a failed or cancelled
        prompt left it usable."""
        assert node in self.object_info(node), f"{node} is no longer registered"
        assert self.get("/queue")["queue_running"] == [], "a prompt is still running"

    def restart(self) -> ComfyServer:
        """Stop and start the server on the same base directory and port: the only way to give
        its memory back (after ComfyUI's own ``POST /free`` the process still held 6.7 GB of the
        families' text encoders and workflows in CI, heap it does not return)."""
        self.stop()
        return self.start()

    def log_offset(self) -> int:
        """Where the server log ends now; ``log_since`` reads what is written after it."""
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        """The server log written after ``offset`` (from ``log_offset``), so a check sees only
        what the prompt it follows wrote, not an earlier test's lines."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for_log(self, offset: int, text: str, timeout: float = 120.0) -> None:
        """Wait until the log after ``offset`` contains ``text`` while a prompt is running;
        fails the test with the log's tail if it does not within ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log_since(offset) and self.get("/queue")["queue_running"]:
                return
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in the server log within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    # --- HTTP ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return json.loads(body) if body else {}

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; raises ``PromptError`` with the server's node_errors on 400."""
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            return self.post("/prompt", payload)["prompt_id"]
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
            raise PromptError(f"prompt rejected: {json.dumps(body)[:2000]}", body) from None

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait for a prompt to finish; return its history entry. Raises ``PromptError`` on
        an execution error (the message carries the node's exception text)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                status = entry["status"]
                if status.get("status_str") == "error":
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    message = errors[0].get("exception_message", "") if errors else "unknown error"
                    raise PromptError(f"execution failed: {message}", entry)
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt; log:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def finished_entry(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """The history entry of a prompt once it has ended in any way (success, error or
        interrupt); fails the test if it is still running after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} had not ended after {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_path(self, image: dict) -> str:
        """Path on disk of an image entry from a history ``outputs`` record."""
        folder = {"output": "output", "temp": "temp", "input": "input"}[image.get("type", "output")]
        return os.path.join(self.base_directory, folder, image.get("subfolder", ""), image["filename"])
