"""DPO training of a LoRA on a ComfyUI MODEL, in the graph: the loop.

``DPOTrainer`` owns a run's state (the LoRA on a cloned patcher, the pair batcher, the
optimiser, the random generator, the history), as core ``TrainSampler`` owns its loss,
optimizer and accumulation. The adapters are in ``lora_adapters``, pair batching and noising
in ``pair_batches``, the losses (pure torch) in ``trainers.losses``. Formulas and choices:
docs/algorithms.md, sections 'Diffusion-DPO and the loss modes' and 'The training loop'.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import torch

from ..comfy_glue.families import latent_downscale, model_family, text_width
from ..comfy_glue.joint import has_joint_attention
from ..pure.errors import InputError
from ..pure.focus import blend_focus
from ..pure.pairs import PreferencePairs
from .lora_adapters import LoraOnModel, attach_lora
from .lora_files import read_lora_layers
from .losses import (
    PreferenceLoss,
    PreferenceObjective,
    channel_stats_loss,
    dpo_loss,
    outside_preservation_loss,
    patchdpo_paper_loss,
)
from .memory_check import MemoryEstimate, check_memory, estimate_training_memory
from .pair_batches import MicroBatch, PairBatcher, default_beta
from .progress import TrainingProgress
from .timesteps import curriculum_pool, sample_percents
from .training_state import TrainingState, check_resumable, config_values, model_fingerprint

# None: decided per run (resolve_dtype)
TRAINING_DTYPES = {"auto": None, "model": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METRICS = ("loss", "accuracy", "margin", "model_winner", "model_loser", "reference_winner", "reference_loser")

# focus_dpo: weight added to every cell of the focus map, so cells the map rates 0 still count
# a little and the weighted means never divide by an all-zero map.
FOCUS_FLOOR = 1e-3
# preserve_outside: its term is scaled like the DPO logit (0.5 * beta * error), so one setting
# means the same at every beta.
PRESERVE_SCALE_PER_BETA = 0.5


@dataclass
class DPOTrainingConfig:
    loss_mode: str = "patch_dpo"
    beta: float = 0.0  # 0: the model's default (pair_batches.default_beta)
    steps: int = 200
    learning_rate: float = 1e-4
    rank: int = 8
    alpha: float = 8.0
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    timestep_start: float = 0.0  # ComfyUI percent: 0 = noisiest
    timestep_end: float = 1.0
    timestep_sampling: str = "uniform"
    dtype: torch.dtype = torch.float32
    lora_mode: str = "bypass"  # see lora_adapters.LORA_MODES
    gradient_checkpointing: bool = False
    checkpoint_depth: int = 2  # 1 = the whole diffusion model, 2 = its blocks (see trainers.checkpointing)
    stats_weight: float = 0.1  # hg_dpo colour-statistics term
    focus_gate: tuple[float, float, float] = (0.3, 0.7, 1.0)  # gate_start, gate_end, complexity weight
    preserve_outside: float = 0.0  # patch_dpo / focus_dpo: anchor low-weight cells to the reference
    # How the DPO logit becomes the loss (losses.PreferenceObjective; not patchdpo_paper):
    preference_loss: str = "sigmoid"  # or "ipo"
    margin_cap: float = 0.0  # 0 = none
    supervised_weight: float = 0.0  # the winners' supervised term
    adaptive_beta: float = 0.0  # beta-DPO's alpha; 0 = a fixed beta

    @property
    def objective(self) -> PreferenceObjective:
        return PreferenceObjective(
            loss=self.preference_loss,
            margin_cap=self.margin_cap,
            supervised_weight=self.supervised_weight,
            adaptive_beta=self.adaptive_beta,
        )


@dataclass
class DataParallel:
    """This process's part in a data-parallel run: every process draws the same global
    micro-batches (same seed) and computes ``share`` of each; ``mean_all_reduce`` (accelerate's
    ``reduce`` in the headless trainer) averages a tensor over the processes."""

    rank: int = 0
    processes: int = 1
    mean_all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def share(self, count: int) -> list[int]:
        """This process's positions among ``count`` pairs (every ``processes``-th)."""
        return list(range(self.rank, count, self.processes))


@dataclass
class DPOTrainingResult:
    lora: LoraOnModel
    model: object = None  # the input MODEL's clone with the trained LoRA on, for sampling
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0  # over every run that led here (a resumed run counts its state's steps)
    state: TrainingState | None = None  # the run's resumable state at its end
    memory: MemoryEstimate | None = None  # the peak memory estimated before the model was loaded


class NonFiniteLoss(InputError):
    """The loss became NaN or infinite; raised before the bad update is applied."""


class TrainingOutOfMemory(InputError):
    """A step needed more memory than the device has; the message says what to change."""


def out_of_memory_advice(config: DPOTrainingConfig) -> str:
    """What lowers a run's memory, for the settings it has."""
    changes = []
    if config.lora_mode != "bypass":
        changes.append("set lora_mode to bypass (no merged weight per layer)")
    if not config.gradient_checkpointing:
        changes.append("turn on gradient_checkpointing")
    elif config.checkpoint_depth < 2:
        changes.append("set checkpoint_depth to 2 (one block's activations at a time)")
    changes.append("lower batch_size or the pairs' image size")
    return "; ".join(changes)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class DPOTrainer:
    """One training run: a LoRA on a clone of ``model_patcher`` (never modified), trained on
    ``pairs`` with ``config``. ``train_dpo_lora`` builds and runs one with autograd on."""

    def __init__(
        self,
        model_patcher,
        pairs: PreferencePairs,
        config: DPOTrainingConfig,
        *,
        resume: dict[str, torch.Tensor] | None = None,
        state: TrainingState | None = None,
        parallel: DataParallel | None = None,
    ):
        self.pairs = pairs
        self.config = config
        self.fingerprint = model_fingerprint(model_patcher)
        if state is not None:
            if resume is not None:
                raise InputError("give a resume LoRA or a training state, not both: the state holds its LoRA")
            check_resumable(state, config_values(config), self.fingerprint)
            resume = state.lora
        self.beta = run_beta(config, model_patcher)
        if not config.beta:
            logging.info("DPO beta: %g, the default for this model's prediction space.", self.beta)
        self.parallel = parallel or DataParallel()
        resumed = read_lora_layers(resume, model_patcher) if resume is not None else None
        self.lora = attach_lora(
            model_patcher, config.rank, config.alpha, resumed, seed=config.seed, mode=config.lora_mode
        )
        patcher = self.lora.patcher
        if config.gradient_checkpointing:
            blocks = self.lora.checkpoint_blocks(config.checkpoint_depth)
            logging.info("Gradient checkpointing: %d blocks at depth %d.", blocks, config.checkpoint_depth)
        if config.dtype != torch.float32:
            patcher.set_model_compute_dtype(config.dtype)
        self.device = patcher.load_device
        self.autocast = torch.autocast(
            device_type=self.device.type, dtype=config.dtype, enabled=config.dtype != torch.float32
        )
        self._warn_about_references(has_joint_attention(patcher))
        self.memory = self.check_memory()
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        # After loading: the model then holds this patcher's object patches (its model_sampling).
        self.batcher = PairBatcher(patcher, pairs)
        if self.batcher.joint:
            logging.info("Training in the joint batch with %d reference latents.", pairs.references.shape[0])
        trainable = [p for p in self.lora.parameters.values() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        # fp16 gradients underflow: scale the loss, as core TrainLoraNode does for fp16 models
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if config.dtype == torch.float16 else None
        self.preference = PreferenceLoss(config.objective)
        self.steps_before = 0  # steps of the runs this one continues
        if state is not None:
            self.restore(state)
        self.history: dict[str, list[float]] = {name: [] for name in METRICS}
        self.steps_done = 0

    def check_memory(self) -> MemoryEstimate | None:
        """Estimate the run's peak memory before the model is loaded, and refuse a run that
        does not fit the device (``memory_check``). The probe's micro-batch draws from its own
        generator, so the run's random stream stays as it was."""
        config = self.config
        # Before loading, the model may still hold another patcher's object patches (a sampling
        # of another prediction space): shapes are right, values may not be, which memory ignores.
        batcher = PairBatcher(self.lora.patcher, self.pairs)
        probe = batcher.batch(
            [0] * config.batch_size, torch.full((config.batch_size,), 0.5), torch.Generator().manual_seed(0)
        )
        estimate = estimate_training_memory(self.lora, batcher, probe, config)
        if estimate is not None:
            check_memory(estimate, self.device, self.lora.patcher.model, out_of_memory_advice(config))
        return estimate

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {key: p for key, p in self.lora.parameters.items() if p.requires_grad}

    def restore(self, state: TrainingState) -> None:
        """Continue ``state``: AdamW's moments, the generator, beta-DPO's mean, the step count."""
        for key, parameter in self.trainable().items():
            moments = state.optimizer.get(key)
            if moments is not None:
                # Copies: a state read under ComfyUI's inference mode holds inference tensors,
                # which AdamW cannot update in place.
                self.optimizer.state[parameter] = {
                    name: value.to(parameter.device if name != "step" else value.device, copy=True)
                    for name, value in moments.items()
                }
        self.generator.set_state(state.generator)
        if self.grad_scaler is not None and state.grad_scaler:
            self.grad_scaler.load_state_dict(state.grad_scaler)
        if self.preference.adaptive is not None:
            self.preference.adaptive.running_mean = state.adaptive_mean
        self.steps_before = state.steps_done

    def training_state(self) -> TrainingState:
        """The state after the steps done so far (``restore`` continues it)."""
        optimizer = {
            key: {name: value.detach().to("cpu", copy=True) for name, value in self.optimizer.state[p].items()}
            for key, p in self.trainable().items()
            if p in self.optimizer.state
        }
        adaptive = self.preference.adaptive
        return TrainingState(
            lora=self.lora.state_dict(),
            optimizer=optimizer,
            steps_done=self.steps_before + self.steps_done,
            generator=self.generator.get_state(),
            adaptive_mean=adaptive.running_mean if adaptive is not None else None,
            grad_scaler=self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            options=config_values(self.config),
            model=self.fingerprint,
        )

    def _warn_about_references(self, joint: bool) -> None:
        references = self.pairs.references
        if references is not None and not joint:
            logging.warning(
                "The pairs carry %d reference latents but the MODEL has no Joint Attention; training "
                "without them (connect the MODEL through Joint Attention for joint-set training).",
                references.shape[0],
            )
        elif joint and references is None:
            logging.warning(
                "The MODEL has Joint Attention but the pairs carry no references; it is off while "
                "training (give the pair builder the reference photos for joint-set training)."
            )

    def run(self, progress: TrainingProgress | None = None) -> DPOTrainingResult:
        """Train ``config.steps`` optimiser steps, reporting each to ``progress`` (log lines,
        checkpoints, the node's progress bar, which raises on Cancel)."""
        config = self.config
        stages = self.pairs.difficulty_indices()
        if progress is not None:
            progress.start(self.steps_before)
        try:
            for step in range(config.steps):
                pool = curriculum_pool(stages, len(self.pairs), config.loss_mode == "hg_dpo", step, config.steps)
                try:
                    totals = self.step(pool, step)
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    raise TrainingOutOfMemory(
                        f"training ran out of memory at step {step + 1} ({error}). To fit: "
                        f"{out_of_memory_advice(config)}."
                    ) from None
                self.steps_done = step + 1
                for name in METRICS:
                    self.history[name].append(totals[name])
                if progress is not None:
                    progress.after_step(self.steps_done, totals, self.lora, self.training_state)
            state = self.training_state()  # before release clears the optimizer
        finally:
            self.release()
        return DPOTrainingResult(
            lora=self.lora,
            model=self.lora.inference_patcher(),
            history=self.history,
            steps_done=self.steps_before + self.steps_done,
            state=state,
            memory=self.memory,
        )

    def step(self, pool: list[int], step: int) -> dict[str, float]:
        """One optimiser step over ``grad_accumulation`` micro-batches drawn from ``pool``;
        returns the metrics averaged over them (and over all processes of a parallel run)."""
        config, parallel = self.config, self.parallel
        totals = {name: 0.0 for name in METRICS}
        for _ in range(config.grad_accumulation):
            picks = torch.randint(len(pool), (config.batch_size,), generator=self.generator)
            indices = [pool[i] for i in picks.tolist()]
            percents = sample_percents(
                len(indices), config.timestep_start, config.timestep_end, config.timestep_sampling, self.generator
            )
            rows = parallel.share(len(indices)) if parallel.processes > 1 else None
            micro = self.batcher.batch(indices, percents, self.generator, rows)
            own = indices if rows is None else [indices[i] for i in rows]
            terms = self.loss_terms(own, micro)
            loss = terms.pop("loss")
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"the loss became {float(loss)} at step {step + 1}. Lower the learning rate or "
                    "beta, or check the pairs (NaN latents, a VAE of another model)."
                )
            # Each loss is a mean over its pairs: weighting by the share of the global batch makes
            # the processes' mean gradient the global batch's.
            share = len(own) / len(indices)
            scaled = loss * (share * parallel.processes) / config.grad_accumulation
            (scaled if self.grad_scaler is None else self.grad_scaler.scale(scaled)).backward()
            totals["loss"] += float(loss.detach()) * share / config.grad_accumulation
            for name, value in terms.items():
                totals[name] += float(value) * share / config.grad_accumulation
        if parallel.processes > 1:
            totals = self.all_reduce(totals)  # before the scaler looks for inf: every process skips alike
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def all_reduce(self, totals: dict[str, float]) -> dict[str, float]:
        """Average the LoRA's gradients over the processes (one flat all-reduce) and sum their
        shares of the metrics."""
        trainable = [p for p in self.lora.parameters.values() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        processes = self.parallel.processes
        metrics = torch.tensor([totals[name] * processes for name in METRICS], device=self.device)
        flat = self.parallel.mean_all_reduce(torch.cat([metrics, *(g.flatten() for g in grads)]))
        offset = len(METRICS)
        for parameter, grad in zip(trainable, grads, strict=True):
            parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()
        return dict(zip(METRICS, flat[: len(METRICS)].tolist(), strict=True))

    def release(self) -> None:
        """Also on Cancel or an error: gradients and optimiser state go, the cache is emptied."""
        for parameter in self.lora.parameters.values():
            parameter.requires_grad_(False)
            parameter.grad = None
        self.optimizer.state.clear()
        comfy.model_management.soft_empty_cache()

    def loss_terms(self, indices: list[int], micro: MicroBatch) -> dict[str, torch.Tensor]:
        """One micro-batch's loss and diagnostics for the configured mode."""
        config = self.config
        batch = len(indices)
        mode = config.loss_mode
        maps = self.batcher.maps.apply(lambda value: value[indices])
        with self.autocast:
            if mode == "patchdpo_paper":
                reference = None
            else:
                with self.lora.switch.off(), torch.no_grad():
                    reference = self.batcher.predict(micro.x_t, micro.sigma, micro.kwargs, micro)
            prediction = self.batcher.predict(micro.x_t, micro.sigma, micro.kwargs, micro)
        errors = micro.errors(prediction)
        model_w, model_l = errors[:batch], errors[batch:]
        zero = torch.zeros((), device=self.device)
        if mode == "patchdpo_paper":
            loss = patchdpo_paper_loss(model_w, model_l, maps.winner_weights, maps.loser_quality)
            return {
                "loss": loss,
                "accuracy": zero,
                "margin": zero,
                "model_winner": model_w.mean().detach(),
                "model_loser": model_l.mean().detach(),
                "reference_winner": zero,
                "reference_loser": zero,
            }
        reference_errors = micro.errors(reference)
        weights_w = weights_l = None
        if mode == "patch_dpo":
            weights_w, weights_l = maps.winner_weights, maps.loser_weights
        elif mode == "focus_dpo":
            # FocusDPO's pairs are pixel-aligned, so both images take the loser's focus map.
            gate_start, gate_end, weight = config.focus_gate
            focus = blend_focus(
                1.0 - maps.loser_quality,
                maps.loser_complexity,
                micro.percents.to(self.device),
                gate_start,
                gate_end,
                weight,
            )
            weights_w = weights_l = focus + FOCUS_FLOOR
        terms = dpo_loss(
            model_w,
            model_l,
            reference_errors[:batch],
            reference_errors[batch:],
            self.beta,
            weights_w,
            weights_l,
            preference=self.preference,
        )
        loss = terms.loss
        if weights_w is not None and config.preserve_outside > 0:
            preserve = outside_preservation_loss(prediction, reference, torch.cat([weights_w, weights_l]), micro.scale)
            loss = loss + PRESERVE_SCALE_PER_BETA * self.beta * config.preserve_outside * preserve
        if mode == "hg_dpo" and config.stats_weight > 0:
            # What the policy makes of the generated (loser) image should carry the real photo's
            # colour statistics.
            loss = loss + config.stats_weight * channel_stats_loss(prediction[batch:], micro.x0[:batch])
        return {
            "loss": loss,
            "accuracy": terms.accuracy,
            "margin": terms.margin,
            "model_winner": terms.model_winner,
            "model_loser": terms.model_loser,
            "reference_winner": terms.reference_winner,
            "reference_loser": terms.reference_loser,
        }


def train_dpo_lora(
    model_patcher,
    pairs: PreferencePairs,
    config: DPOTrainingConfig,
    *,
    resume: dict[str, torch.Tensor] | None = None,
    state: TrainingState | None = None,
    progress: TrainingProgress | None = None,
    parallel: DataParallel | None = None,
) -> DPOTrainingResult:
    """Train a LoRA on ``model_patcher`` (never modified) from ``pairs`` (see ``DPOTrainer.run``),
    continuing ``resume`` (a LoRA file's tensors) or ``state`` (a whole run's) if given, reporting
    to ``progress``; ``parallel``: this process's part of a data-parallel run (headless trainer).

    Raises:
        InputError: pairs of another latent family, an unusable resume LoRA or rank, a state of
            other settings or another model.
        NonFiniteLoss: a NaN/inf loss, before the bad update is applied.
    """
    pairs.validate()
    latent_format = model_patcher.model.latent_format
    if (
        pairs.latent_channels != latent_format.latent_channels
        or pairs.winners.shape[1] != latent_format.latent_channels
    ):
        raise InputError(
            f"the pairs were encoded by a VAE with {pairs.latent_channels}-channel latents but this "
            f"model expects {latent_format.latent_channels}; build the pairs with this model's VAE"
        )
    check_text_width(pairs, model_patcher.model)
    # ComfyUI runs nodes under inference mode; adapters, inputs and the graph must be normal tensors.
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        return DPOTrainer(model_patcher, pairs, config, resume=resume, state=state, parallel=parallel).run(progress)


def check_text_width(pairs: PreferencePairs, model) -> None:
    """Refuse pairs whose conditioning another model's text encoder made (Z-Image's 2560-wide
    states for Qwen-Image's 3584), which would otherwise fail inside the first forward."""
    width = text_width(model)
    if width is None:
        return
    for conditioning in pairs.conditionings:
        for cond, _ in conditioning:
            if cond.shape[-1] != width:
                raise InputError(
                    f"the pairs' conditioning holds {cond.shape[-1]}-wide text states but this "
                    f"{model_family(model).name} model reads {width}-wide ones: another model's text encoder "
                    "made them. Encode the prompts with this model's text encoder and build the pairs again"
                )


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's own training switch, on while training (core TrainLoraNode sets it the same way):
    kernels without a backward (comfy_kitchen's RoPE in Flux, ComfyUI 0.33) then run as plain,
    differentiable torch code. Older ComfyUI has no such switch and needs none."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def resolve_dtype(choice: str, device: torch.device, model_dtype: torch.dtype | None = None) -> torch.dtype:
    """A ``TRAINING_DTYPES`` choice; ``auto``: bf16 on a GPU that supports it, else fp32 (CPU
    autocast is slow and lossy); ``model``: the model's own dtype (``model_dtype``) as core
    TrainLoraNode's ``none`` (fp8 and other storage dtypes compute in bf16, as there), ``auto``
    where it is unknown."""
    if TRAINING_DTYPES[choice] is not None:
        return TRAINING_DTYPES[choice]
    if choice == "model" and model_dtype is not None:
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def run_beta(config: DPOTrainingConfig, model_patcher) -> float:
    """The beta a run uses: the config's, or the model's default where it names none (0)."""
    return config.beta or default_beta(model_patcher.get_model_object("model_sampling"))


def training_metadata(
    config: DPOTrainingConfig, pairs: PreferencePairs, model_patcher, steps: int, *, processes: int | None = None
) -> dict:
    """A run's entries for the LoRA file header (``lora_files.file_metadata`` adds the model's);
    sd-scripts' ``ss_`` names where it has one; ``processes``: a headless run's process count."""
    ratio = latent_downscale(model_patcher.model)
    height, width = (ratio * side for side in pairs.latent_size)
    metadata = {
        "ss_steps": str(steps),
        "ss_max_train_steps": str(config.steps),
        "ss_resolution": f"({width}, {height})",
        "ss_learning_rate": f"{config.learning_rate:g}",
        "ss_seed": str(config.seed),
        "prefp_loss_mode": config.loss_mode,
        "prefp_preference_loss": config.preference_loss,
        "prefp_beta": f"{run_beta(config, model_patcher):g}",
        "prefp_pair_count": str(len(pairs)),
        "prefp_batch_size": str(config.batch_size * config.grad_accumulation),
        "prefp_timestep_range": f"{config.timestep_start:g}-{config.timestep_end:g}",
    }
    if processes is not None:
        metadata["prefp_processes"] = str(processes)
    return metadata
