"""DPO LoRA Trainer node: finetunes a LoRA on the graph's MODEL from preference pairs."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui
from PIL import Image

from ..pure.drawing import training_plot
from ..pure.errors import InputError
from ..pure.files import sanitize_file_stem, unused_stem
from ..trainers.jobs import export_job
from ..trainers.loop import TRAINING_DTYPES, train_dpo_lora, training_metadata
from ..trainers.lora_adapters import LORA_MODES
from ..trainers.lora_files import LORA_LAYOUTS, LoraWithMetadata, save_lora_to_output
from ..trainers.losses import LOSS_MODES, PREFERENCE_LOSSES
from ..trainers.options import training_settings
from ..trainers.previews import PreviewSettings, TrainingPreviews
from ..trainers.progress import TrainingProgress
from ..trainers.timesteps import TIMESTEP_SAMPLING
from ..trainers.training_state import STATE_SUFFIX, read_state
from .errors import check_number_inputs, node_errors
from .types import CATEGORY, PreferencePairsType

NO_STATE = "none"
# The trainer node's own inputs for previews while it trains (the headless runner has none).
PREVIEW_INPUTS = (
    io.Int.Input(
        "preview_every",
        default=0,
        min=0,
        max=100000,
        optional=True,
        tooltip="Every N steps, sample a few images with the LoRA as it is and show them on the node (0 = none, "
        "costs nothing).",
    ),
    io.Int.Input(
        "preview_images",
        default=2,
        min=1,
        max=8,
        optional=True,
        tooltip="Images per preview: the pairs' prompts in turn, each at a fixed seed, so previews compare.",
    ),
    io.Int.Input(
        "preview_steps",
        default=8,
        min=1,
        max=100,
        optional=True,
        tooltip="Sampling steps of each preview image (euler, cfg 1).",
    ),
    io.Vae.Input(
        "vae",
        optional=True,
        tooltip="Decodes the previews; without it they are ComfyUI's quick latent previews at latent size.",
    ),
)


def output_loras() -> str:
    """output/loras/, where the trainer saves its checkpoints and their states."""
    return os.path.join(folder_paths.get_output_directory(), "loras")


def saved_states() -> list[str]:
    """The training states in output/loras/ (and its subfolders), newest first."""
    folder = output_loras()
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, name) for name in files if name.endswith(STATE_SUFFIX)]
    found.sort(key=os.path.getmtime, reverse=True)
    return [os.path.relpath(path, folder) for path in found]


TRAIN_COMMAND = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_dpo.py")


# The trainer's options (trainers.options.OPTIONS), shared by the DPO LoRA Trainer and Export
# Training Job (whose job file the headless trainer reads): the required ones, then the optional
# ones (kept after the others, so saved workflows' widget values keep their places).
TRAINING_OPTIONS = (
    io.Combo.Input(
        "loss_mode",
        options=list(LOSS_MODES),
        default="patch_dpo",
        tooltip="dpo, patch_dpo (patch-weighted), patchdpo_paper, focus_dpo or hg_dpo.",
    ),
    io.Float.Input(
        "beta",
        default=0.0,
        min=0.0,
        max=100000.0,
        step=50.0,
        tooltip="DPO temperature. 0: the model's default, 5000 for noise-prediction models (SD1.5, SDXL) and "
        "100 for flow models (SD3.5, Flux.1 and .2, Z-Image, Qwen-Image, Chroma, HiDream), whose errors are "
        "velocity errors.",
    ),
    io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimiser steps."),
    io.Float.Input(
        "learning_rate",
        default=1e-4,
        min=1e-7,
        max=1e-1,
        step=1e-6,
        tooltip="AdamW learning rate of the LoRA.",
    ),
    io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank."),
    io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.5, tooltip="LoRA alpha (scale = alpha / rank)."),
    io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Pairs per micro-batch."),
    io.Int.Input("grad_accumulation", default=1, min=1, max=256, tooltip="Micro-batches per optimiser step."),
    io.Int.Input(
        "seed",
        default=0,
        min=0,
        max=0xFFFFFFFF,
        tooltip="Seed of pair order, timesteps and noise: same seed, same LoRA.",
    ),
    io.Float.Input(
        "timestep_start",
        default=0.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="Lowest sampling percent trained (0 = the noisiest step).",
    ),
    io.Float.Input(
        "timestep_end",
        default=1.0,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="Highest sampling percent trained (1 = the last step).",
    ),
    io.Combo.Input(
        "timestep_sampling",
        options=list(TIMESTEP_SAMPLING),
        default="uniform",
        tooltip="How percents are drawn in the range: uniform, or logit-normal (middle-heavy).",
    ),
    io.Combo.Input(
        "training_dtype",
        options=list(TRAINING_DTYPES),
        default="auto",
        tooltip="Compute dtype: auto = bf16 on a GPU that has it, fp32 on CPU; model = the model's own dtype "
        "(fp16 models train with a gradient scaler, as core's 'none').",
    ),
    io.Boolean.Input(
        "gradient_checkpointing",
        default=False,
        tooltip="Recompute each block's activations in backward (see checkpoint_depth): much less "
        "memory for one extra forward.",
    ),
    io.Float.Input(
        "stats_weight",
        default=0.1,
        min=0.0,
        max=100.0,
        step=0.01,
        tooltip="hg_dpo only: weight of the colour-statistics matching term.",
    ),
    io.Float.Input(
        "preserve_outside",
        default=0.0,
        min=0.0,
        max=100.0,
        step=0.1,
        tooltip="patch_dpo / focus_dpo: also keep the model's prediction unchanged where the "
        "pairs' weights are 0 (e.g. outside a painted mask), so the LoRA's effect "
        "stays in the weighted regions. 0 = plain patch-weighted DPO: weights choose "
        "which differences are learned, but what is learned can show anywhere. "
        "~1 is a good start; it also slows learning.",
    ),
    io.Int.Input(
        "save_every",
        default=0,
        min=0,
        max=100000,
        tooltip="Save a checkpoint LoRA to output/loras/ every N steps (0 = only on Cancel).",
    ),
)
OPTIONAL_TRAINING_OPTIONS = (
    io.Combo.Input(
        "lora_mode",
        options=list(LORA_MODES),
        default="bypass",
        optional=True,  # optional: API prompts saved before it existed still run
        tooltip="bypass: the LoRA runs beside each layer, y = layer(x) + up(down(x)); least memory and "
        "works on fp8 weights. weight: each layer's weight is rebuilt as W + up·down on every forward "
        "(core TrainLoraNode's default).",
    ),
    io.Int.Input(
        "checkpoint_depth",
        default=2,
        min=1,
        max=5,
        optional=True,
        tooltip="With gradient_checkpointing: 1 checkpoints the whole model, 2 each block (ResBlock, "
        "transformer), 3 and up smaller parts. Lower it if training runs out of memory.",
    ),
    io.Combo.Input(
        "preference_loss",
        options=list(PREFERENCE_LOSSES),
        default="sigmoid",
        optional=True,
        tooltip="sigmoid: Diffusion-DPO's -log sigmoid(margin); ipo: IPO's squared distance of the margin to 1/2, "
        "which stops pushing once winners and losers are told apart (not for patchdpo_paper).",
    ),
    io.Float.Input(
        "margin_cap",
        default=0.0,
        min=0.0,
        max=100.0,
        step=0.5,
        optional=True,
        tooltip="Caps the loser's share of the DPO margin: past it a pair stops pushing the loser's images "
        "away, so they are not unlearned without end and the margin grows only by fitting the winner "
        "(0 = no cap; 2 is a safe start).",
    ),
    io.Float.Input(
        "supervised_weight",
        default=0.0,
        min=0.0,
        max=10.0,
        step=0.05,
        optional=True,
        tooltip="Adds plain denoising training on the winners, weighted against the DPO term's pull on them "
        "(0 = off; 0.25 keeps the model near the winners' images).",
    ),
    io.Float.Input(
        "adaptive_beta",
        default=0.0,
        min=0.0,
        max=10.0,
        step=0.05,
        optional=True,
        tooltip="beta-DPO: beta grows for batches the model already tells apart more than usual and shrinks "
        "for harder ones, within [beta/4, 4 beta] (0 = a fixed beta; 0.5 is a start).",
    ),
)


class ProgressBarView:
    """The trainer node's ``show`` for ``TrainingProgress``: ComfyUI's progress bar with the
    latest ``previews`` where they are due, else a plot preview every tenth of the run; stops the
    run (raises) when the user presses Cancel."""

    PREVIEWS = 10

    def __init__(self, steps: int, previews: TrainingPreviews | None = None):
        self.steps, self.bar, self.previews = steps, comfy.utils.ProgressBar(steps), previews

    def __call__(self, step: int, history: dict[str, list[float]], lora) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        image = None
        if self.previews is not None and self.previews.due(step):
            self.previews.take(lora.patcher, step)
            image = self.previews.strip()
        elif step % max(1, self.steps // self.PREVIEWS) == 0 or step == self.steps:
            image = training_plot(history)
        preview = None if image is None else ("JPEG", Image.fromarray((image.numpy() * 255).astype("uint8")), 512)
        self.bar.update_absolute(step, self.steps, preview)


class DPOLoraTrainer(io.ComfyNode):
    TITLE = "DPO LoRA Trainer"
    ORDERED_INPUTS = (("timestep_start", "timestep_end"),)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_DPOLoraTrainer",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Trains a LoRA on the MODEL with a DPO loss from preference pairs (winner preferred over "
                "loser at the same timestep and noise; the reference is the same model with the LoRA off). "
                "patch_dpo weights every latent cell by the pairs' maps; patchdpo_paper is PatchDPO's released "
                "weighted MSE; focus_dpo uses FocusDPO focus maps gated by timestep; hg_dpo trains real-photo "
                "pairs with an easy->normal->hard curriculum and a colour-statistics term. Pairs that carry "
                "reference photos train in JeDi's joint batch when the MODEL went through Joint Attention. "
                "The input MODEL is never changed. A run too large for the device's free memory is refused before the "
                "model loads, with what to change. Cancel stops cleanly and saves the last good LoRA to output/loras/."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to train a LoRA on (stays unchanged)."),
                PreferencePairsType.Input(
                    "pairs", tooltip="From a Preference Pairs node (built with this model's VAE)."
                ),
                *TRAINING_OPTIONS,
                io.String.Input("save_prefix", default="dpo_lora", tooltip="File name prefix of saved checkpoints."),
                *OPTIONAL_TRAINING_OPTIONS,
                io.LoraModel.Input(
                    "resume_lora",
                    optional=True,
                    tooltip="Optional LoRA (e.g. from Load LoRA Model) to continue training.",
                ),
                io.Combo.Input(
                    "resume_state",
                    options=[NO_STATE, *saved_states()],
                    default=NO_STATE,
                    optional=True,
                    tooltip="Continue a run exactly where it stopped: a training state save_every wrote beside its "
                    "checkpoint in output/loras/ (its LoRA, optimizer, step and random state). The other options "
                    "must be the run's; steps is how many more to train.",
                ),
                *PREVIEW_INPUTS,
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA (Save LoRA Weights writes it)."),
                io.LossMap.Output(display_name="loss_map", tooltip="Loss and diagnostics per step."),
                io.Image.Output(display_name="plot", tooltip="Loss, accuracy, margin and the four raw errors."),
                io.Int.Output(
                    display_name="steps", tooltip="Steps trained (Save LoRA Weights puts it in the file name)."
                ),
                io.Image.Output(
                    display_name="previews",
                    tooltip="The previews (preview_every), one row per step; a blank image when previews are off.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        pairs,
        save_prefix,
        resume_lora=None,
        resume_state=NO_STATE,
        vae=None,
        preview_every=0,
        preview_images=2,
        preview_steps=8,
        **options,
    ) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, {**options, "preview_every": preview_every, "preview_steps": preview_steps})
            if len(pairs) == 0:
                raise InputError("the pair set is empty; build pairs first.")
            settings = training_settings(options, model.load_device, model.model.get_dtype())
            state = None
            if resume_state != NO_STATE:
                state = read_state(os.path.join(output_loras(), resume_state))
            preview_settings = PreviewSettings(every=preview_every, images=preview_images, steps=preview_steps)
            previews = TrainingPreviews(pairs, preview_settings, vae.decode if vae is not None else None)
        config = settings.config

        def save(lora, step, stem):
            tensors = LoraWithMetadata(lora.state_dict(), training_metadata(config, pairs, model, step))
            return save_lora_to_output(tensors, stem, model, layout="comfyui")

        progress = TrainingProgress(
            config.steps,
            name=sanitize_file_stem(save_prefix) or "dpo_lora",
            save=save,
            save_every=settings.save_every,
            show=ProgressBarView(config.steps, previews),
            label=cls.TITLE,
        )
        try:
            with node_errors(cls.TITLE):
                result = train_dpo_lora(model, pairs, config, resume=resume_lora, state=state, progress=progress)
        except comfy.model_management.InterruptProcessingException:
            progress.save_last_good_lora()
            raise

        plot = training_plot(result.history).unsqueeze(0)
        loss_map = {name: values for name, values in result.history.items()}
        grid = previews.grid()
        return io.NodeOutput(
            result.model,
            LoraWithMetadata(result.lora.state_dict(), training_metadata(config, pairs, model, result.steps_done)),
            loss_map,
            plot,
            result.steps_done,
            torch.zeros(1, 64, 64, 3) if grid is None else grid,
            ui=ui.PreviewImage(plot, cls=cls),
        )


class SaveDPOLora(io.ComfyNode):
    TITLE = "Save DPO LoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_SaveDPOLora",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Writes a LoRA to output/loras/ with its training run in the file header (base family, rank, alpha, "
                "loss mode, beta, steps, pair count, resolution, pack version). kohya layout (lora_unet_... keys, as "
                "sd-scripts and musubi-tuner write them) for SD1.x/SD2.x/SDXL, SD3, Flux.1, Flux.2, Chroma and "
                "Qwen-Image; diffusers layout (transformer.... lora_A/lora_B, as diffusers, SimpleTuner and "
                "ai-toolkit write them) for SD3, Flux.1, Chroma, Qwen-Image, Z-Image and HiDream; the comfyui "
                "layout (Save LoRA Weights' keys) works for every model family ComfyUI trains. A layout a family "
                "has no naming for is refused, naming those that work."
            ),
            is_output_node=True,
            inputs=[
                io.LoraModel.Input("lora", tooltip="From the DPO LoRA Trainer (or Load LoRA Model)."),
                io.Model.Input("model", tooltip="The model the LoRA was trained on: it names the layers."),
                io.String.Input("filename_prefix", default="dpo_lora", tooltip="File name under output/loras/."),
                io.Combo.Input(
                    "layout",
                    options=list(LORA_LAYOUTS),
                    default="kohya",
                    tooltip="kohya: sd-scripts/musubi-tuner keys; diffusers: diffusers/ai-toolkit keys; comfyui: "
                    "ComfyUI's own keys, any model family (the README lists each family's layouts).",
                ),
                io.Int.Input(
                    "steps",
                    optional=True,
                    min=0,
                    max=1000000,
                    force_input=True,
                    tooltip="Steps trained (the trainer's steps output): put in the file name.",
                ),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lora, model, filename_prefix, layout, steps=None) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            stem = sanitize_file_stem(filename_prefix) or "dpo_lora"
            if steps is not None:
                stem = f"{stem}_{steps}_steps"
            path = save_lora_to_output(lora, stem, model, layout)
        return io.NodeOutput(ui=ui.PreviewText(f"Saved {path}"))


MODEL_FOLDERS = {"checkpoints": "checkpoint", "diffusion_models": "diffusion_model"}


def model_files() -> list[str]:
    """Checkpoints and diffusion models as ``<folder>/<file>``, for Export Training Job."""
    return [f"{folder}/{name}" for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder)]


class ExportTrainingJob(io.ComfyNode):
    TITLE = "Export Training Job"
    ORDERED_INPUTS = DPOLoraTrainer.ORDERED_INPUTS

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PrefP_ExportTrainingJob",
            display_name=cls.TITLE,
            category=CATEGORY,
            description=(
                "Writes the pairs and a job file to output/training_jobs/<name>/, for the headless trainer: "
                "python tools/train_dpo.py <folder>/job.json --processes N trains the same LoRA as the DPO "
                "LoRA Trainer with these options, data-parallel on N GPUs (accelerate), and writes it beside the job."
            ),
            is_output_node=True,
            inputs=[
                PreferencePairsType.Input("pairs", tooltip="The pair set to train on."),
                io.Model.Input("model", tooltip="The model the pairs are for (the job records its family)."),
                io.Combo.Input(
                    "model_file",
                    options=model_files(),
                    tooltip="The file that MODEL was loaded from: the headless trainer loads it.",
                ),
                io.String.Input("name", default="dpo_job", tooltip="Folder under output/training_jobs/."),
                io.Combo.Input("layout", options=list(LORA_LAYOUTS), default="kohya", tooltip="Layout of the LoRA."),
                *TRAINING_OPTIONS,
                *OPTIONAL_TRAINING_OPTIONS,
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, model_file):
        folder, _, name = model_file.partition("/")
        if folder not in MODEL_FOLDERS or folder_paths.get_full_path(folder, name) is None:
            return f"{cls.TITLE}: '{model_file}' is not in models/checkpoints or models/diffusion_models."
        return True

    @classmethod
    def execute(cls, pairs, model, model_file, name, layout, **options) -> io.NodeOutput:
        with node_errors(cls.TITLE):
            check_number_inputs(cls, options)
            if len(pairs) == 0:
                raise InputError("the pair set is empty; build pairs first.")
            folder, _, file = model_file.partition("/")
            jobs = os.path.join(folder_paths.get_output_directory(), "training_jobs")
            stem = unused_stem(jobs, sanitize_file_stem(name) or "dpo_job", extension="")
            job = export_job(
                pairs,
                model,
                os.path.join(jobs, stem),
                model_kind=MODEL_FOLDERS[folder],
                model_path=folder_paths.get_full_path(folder, file),
                options=options,
                layout=layout,
            )
        return io.NodeOutput(ui=ui.PreviewText(f"Wrote {job}\nTrain it: python {TRAIN_COMMAND} {job} --processes N"))
