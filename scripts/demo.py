"""`make demo`: run the pack's workflows end to end in a real ComfyUI, headlessly.

Starts ComfyUI with the pack, loads each workflow of DEMO_WORKFLOWS that this ComfyUI can run
(Flux.2 Klein needs 0.33: `make demo` runs 0.3.75 and says it skips it) in the real frontend
(headless Chromium), shrinks only image size/batch/steps so the tiny random-weight checkpoint
runs in seconds on a CPU, queues it from the page, and copies what they produced (heat maps,
scores, focus strips, metrics, new images, the trained LoRA, a screenshot of each graph) into
demo_output/<timestamp>/. The folder's path is the last line printed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "dev"))  # the harness (dev tooling), not the repo root

from harness.comfy_server import ComfyServer  # noqa: E402
from harness.frontend import Frontend  # noqa: E402
from harness.workflows import QUICK_RUN_WIDGETS, WORKFLOWS_DIR, provide_workflow_models, unsupported_reason  # noqa: E402

DEMO_WORKFLOWS = [
    "patch_quality.json",
    "focus_and_metrics.json",
    "joint_sampling.json",
    "build_pairs_and_train.json",
    "joint_sampling_flux.json",
    "build_pairs_and_train_sd35.json",
    "build_pairs_and_train_z_image.json",
    "build_pairs_and_train_flux2_klein.json",
    "joint_sampling_z_image.json",
    "joint_sampling_flux2_klein.json",
]


def node_titles(workflow: dict) -> dict[str, str]:
    return {str(node["id"]): node.get("title") or node["type"] for node in workflow["nodes"]}


def text_outputs(entry: dict, workflow: dict) -> dict:
    """Text outputs of a finished prompt (scores, reports), by node title."""
    titles = node_titles(workflow)
    previews = {str(node["id"]) for node in workflow["nodes"] if node["type"] == "PreviewAny"}
    return {
        titles.get(node_id, node_id): output["text"][0]
        for node_id, output in entry["outputs"].items()
        if output.get("text") and node_id not in previews
    }  # PreviewAny only repeats a node's text


def main() -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = os.path.join(REPO_ROOT, "demo_output", stamp)
    partial = folder + ".partial"
    os.makedirs(partial)
    paths = []
    for name in DEMO_WORKFLOWS:
        path = os.path.join(WORKFLOWS_DIR, name)
        reason = unsupported_reason(path)
        if reason:
            print(f"Skipping workflows/{name}: {reason}.", flush=True)
        else:
            paths.append(path)
    print("Starting ComfyUI with the pack (CPU; random-weight tiny checkpoint, no downloads)...", flush=True)
    try:
        with ComfyServer(log_path=os.path.join(partial, "comfyui.log")) as server:
            provide_workflow_models(server, paths)
            with Frontend(server.url) as page:
                for path in paths:
                    name = os.path.basename(path)[: -len(".json")]
                    with open(path, encoding="utf-8") as handle:
                        workflow = json.load(handle)
                    shrunk = {
                        node["type"]: QUICK_RUN_WIDGETS[node["type"]]
                        for node in workflow["nodes"]
                        if node["type"] in QUICK_RUN_WIDGETS
                    }
                    print(
                        f"Running workflows/{name}.json in the real frontend (quick run: {json.dumps(shrunk)})...",
                        flush=True,
                    )
                    page.load_workflow(workflow)
                    page.set_widgets(QUICK_RUN_WIDGETS)
                    started = time.time()
                    entry = page.queue_and_wait(server)
                    page.screenshot(os.path.join(partial, f"{name}_graph.png"))
                    texts = text_outputs(entry, workflow)
                    with open(os.path.join(partial, f"{name}_scores.txt"), "w", encoding="utf-8") as handle:
                        for title, text in texts.items():
                            handle.write(f"[{title}]\n{text}\n\n")
                    print(f"  finished in {time.time() - started:.1f} s", flush=True)
                    for title, text in texts.items():
                        print(f"  [{title}]\n    " + text.replace("\n", "\n    "), flush=True)
            # Everything the workflows saved: images, the trained LoRA, preference pairs.
            shutil.copytree(os.path.join(server.base_directory, "output"), partial, dirs_exist_ok=True)
        os.rename(partial, folder)
    finally:
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)  # never leave a half-written demo folder
    print("Heat maps, scores, focus strips, metrics, new images, the DPO LoRA and graph screenshots are in:")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
