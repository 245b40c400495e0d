"""Every workflow in workflows/ loads in the real ComfyUI frontend (headless Chromium), is
converted by the frontend's own graphToPrompt, is queued from the page and finishes with
execution_success on the tiny checkpoint. Screenshots land in test_artifacts/workflows/.
A workflow whose model this ComfyUI cannot load (Flux.2 Klein on 0.3.75) is skipped, saying so."""

import json
import os

import pytest

from harness.frontend import Frontend
from harness.workflows import QUICK_RUN_WIDGETS, quick_run_widget_count, unsupported_reason, workflow_paths

pytestmark = [pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def frontend(comfy_server):
    with Frontend(comfy_server.url) as page:
        yield page
    # The workflows load the families' text encoders (Qwen3-4B: 4 GB); the session's server
    # outlives this module beside memory-heavy in-process tests (full-size SDXL): a fresh one.
    comfy_server.restart()


def test_there_are_workflows():
    names = [os.path.basename(path) for path in workflow_paths()]
    assert "patch_quality.json" in names


# Each heavy workflow runs on one ComfyUI version to keep CI within the hour (conftest's tiers):
# the 2026 families' on 0.33 (Klein needs it), Flux.1's T5-XXL encode on 0.3.75.
ONE_VERSION = {
    "build_pairs_and_train_z_image.json": pytest.mark.current_comfyui,
    "joint_sampling_z_image.json": pytest.mark.current_comfyui,
    "build_pairs_and_train_flux2_klein.json": pytest.mark.current_comfyui,
    "joint_sampling_flux2_klein.json": pytest.mark.current_comfyui,
    "joint_sampling_flux.json": pytest.mark.oldest_comfyui,
}
WORKFLOWS = [
    pytest.param(path, marks=ONE_VERSION.get(os.path.basename(path), ()), id=os.path.basename(path))
    for path in workflow_paths()
]


@pytest.mark.parametrize("path", WORKFLOWS)
def test_workflow_loads_converts_and_runs(path, frontend, comfy_server, artifacts_dir):
    reason = unsupported_reason(path)
    if reason:
        pytest.skip(reason)
    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    errors_before = len(frontend.console_errors)
    frontend.load_workflow(workflow)
    page_errors = [e for e in frontend.console_errors[errors_before:] if e.startswith("pageerror")]
    assert not page_errors, page_errors

    prompt = frontend.graph_to_prompt()
    known = comfy_server.object_info()
    assert prompt, "graphToPrompt produced an empty prompt"
    assert {node["class_type"] for node in prompt.values()} <= set(known)

    assert frontend.set_widgets(QUICK_RUN_WIDGETS) == quick_run_widget_count(workflow)  # none renamed away
    entry = frontend.queue_and_wait(comfy_server)
    shot = os.path.join(artifacts_dir, "workflows", os.path.basename(path).replace(".json", ".png"))
    frontend.screenshot(shot)

    saved = [
        image
        for output in entry["outputs"].values()
        for image in output.get("images", [])
        if image.get("type") == "output"
    ]
    assert saved, "the workflow saved no images"
    for image in saved:
        assert os.path.getsize(comfy_server.output_path(image)) > 0
