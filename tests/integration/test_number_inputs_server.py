"""Every FLOAT input of every node of the pack, NaN in a prompt queued over HTTP, is refused with
the node's title, the input's name and the fix, and the server keeps serving.

ComfyUI's own checks let NaN through (its min/max comparisons are False for NaN; Python's JSON
writes and reads ``NaN``), so each node's ``execute`` refuses it first (``check_number_inputs``).
The nodes and their FLOAT inputs come from /object_info: a new node is covered without a change
here, as long as its sockets have a provider below.
"""

import math

import pytest

from harness.comfy_server import PromptError
from harness.graphs import BUILTIN_BACKBONE

pytestmark = pytest.mark.server

SIZE = 64
# Cheap upstream nodes, in every prompt under the same ids, so ComfyUI runs each once and then
# serves it from its cache: a prompt costs only the node under test, which fails at once.
PROVIDERS = {
    "101": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
    "102": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["101", 1]}},
    "103": {"class_type": "PrefP_ExampleSubjectPhoto", "inputs": {"photo": "chelsea.png"}},
    "104": {
        "class_type": "ImageScale",
        "inputs": {"image": ["103", 0], "upscale_method": "area", "width": SIZE, "height": SIZE, "crop": "center"},
    },
    "105": {"class_type": "PrefP_PatchBackboneLoader", "inputs": {"backbone": BUILTIN_BACKBONE}},
    "106": {
        "class_type": "PrefP_PatchQualityScore",
        "inputs": {
            "backbone": ["105", 0],
            "generated": ["104", 0],
            "references": ["104", 0],
            "resolution": SIZE,
            "overlay_opacity": 0.5,
        },
    },
    "107": {
        "class_type": "PrefP_PairsFromRealPhotos",
        "inputs": {"vae": ["101", 2], "positive": ["102", 0], "real_photos": ["104", 0], "generated": ["104", 0]},
    },
}
# Socket type -> the provider output that feeds it.
SOCKETS = {
    "MODEL": ["101", 0],
    "CLIP": ["101", 1],
    "VAE": ["101", 2],
    "CONDITIONING": ["102", 0],
    "IMAGE": ["104", 0],
    "PATCH_BACKBONE": ["105", 0],
    "PATCH_QUALITY": ["106", 0],
    "PREFERENCE_PAIRS": ["107", 0],
}
WIDGET_FALLBACKS = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


def input_value(node_id: str, name: str, spec: list):
    """A valid value for one required input: its default (a combo's first option without one),
    or the provider of its socket type."""
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options["options"]
        return options.get("default", choices[0])
    if kind in WIDGET_FALLBACKS:
        return options.get("default", options.get("min", WIDGET_FALLBACKS[kind]))
    assert kind in SOCKETS, f"{node_id}.{name} takes {kind}: add a provider for it to this test"
    return SOCKETS[kind]


def nan_prompt(node_id: str, schema: dict, name: str) -> dict:
    """The smallest prompt that runs ``node_id`` with ``name`` NaN: providers, the node and, for a
    node that is no output, a Preview Any on its first output."""
    inputs = {key: input_value(node_id, key, spec) for key, spec in schema["input"]["required"].items()}
    prompt = {**PROVIDERS, "1": {"class_type": node_id, "inputs": {**inputs, name: math.nan}}}
    if not schema.get("output_node"):
        prompt["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
    return prompt


def float_inputs(info: dict) -> list[tuple[str, str]]:
    """``(node id, input name)`` of every FLOAT input, required or optional, of the pack's nodes."""
    return [
        (node_id, name)
        for node_id, schema in sorted(info.items())
        if node_id.startswith("PrefP_")
        for group in ("required", "optional")
        for name, spec in schema["input"].get(group, {}).items()
        if spec[0] == "FLOAT"
    ]


def test_every_float_input_refuses_nan_with_the_title_and_the_fix(comfy_server):
    info = comfy_server.object_info()
    cases = float_inputs(info)
    nodes = {node for node, _ in cases}
    assert len(cases) >= 28 and nodes >= {"PrefP_DPOLoraTrainer", "PrefP_JointSampler"}, (
        f"{len(cases)} FLOAT inputs on {sorted(nodes)}: is the pack loaded?\n{comfy_server.log_tail()}"
    )
    wrong = []
    for node_id, name in cases:
        schema = info[node_id]
        try:
            comfy_server.run(nan_prompt(node_id, schema, name), timeout=300)
            wrong.append(f"{node_id}.{name}: NaN was accepted")
        except PromptError as error:
            expected = f"{schema['display_name']}: {name} is NaN; set a finite number"
            if expected not in str(error):
                wrong.append(f"{node_id}.{name}: {str(error)[:300]}")
    assert not wrong, "\n".join(wrong)
    comfy_server.assert_serving("PrefP_DPOLoraTrainer")
