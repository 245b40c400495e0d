"""`make serve`: start ComfyUI with the pack for use in a browser.

Uses a persistent base directory in .serve/ (models/, input/, output/, user/) with the pack
linked into custom_nodes/. When models/checkpoints/ is empty, the tiny random-weight test
checkpoint is put there under the name the sample workflows use, so they run (into noise:
put a real SD1.5 checkpoint there for real images).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "dev"))  # the harness (dev tooling), not the repo root

from harness.comfy_server import ComfyServer  # noqa: E402
from harness.workflows import checkpoint_names, workflow_paths  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", default=os.path.join(REPO_ROOT, ".serve"))
    args = parser.parse_args()
    server = ComfyServer(
        base_directory=args.base_directory, port=args.port, log_path=os.path.join(args.base_directory, "comfyui.log")
    )
    server.prepare()
    checkpoints = os.path.join(args.base_directory, "models", "checkpoints")
    if not any(name.endswith((".safetensors", ".ckpt")) for name in os.listdir(checkpoints)):
        for name in checkpoint_names(workflow_paths()):
            server.provide_checkpoint(name)
        print(f"No checkpoint in {checkpoints}: linked the tiny random-weight test checkpoint there.")
    server.start()
    print(f"ComfyUI with the pack is running at {server.url} (log: {server.log_path}). Ctrl+C stops it.")
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
