"""DPO training of a LoRA on a ComfyUI MODEL, in the graph.

The mechanics follow core ``TrainLoraNode`` (ComfyUI's weight-adapter / weight-wrapper path),
so every model family ComfyUI loads trains the same way:

- the incoming ModelPatcher is cloned; every layer with a ``weight_function`` and a 2-D+ weight
  gets a trainable ``comfy.weight_adapter`` LoRA registered with ``add_weight_wrapper``;
  ``comfy.ops`` applies it on every forward, so the forward is differentiable;
- the reference prediction is the same network with the adapters switched off (a flag read by
  the wrappers): no second copy of the model in memory;
- winner and loser share timestep and noise; latents are scaled with the model's own
  ``process_latent_in`` and noised with ``model_sampling.noise_scaling``; the model's x0
  prediction is compared in the model's own target space: x0 errors are scaled per sample by
  1/sigma for eps and flow models (the eps / velocity error) and by sqrt(sigma^2+s^2)/(sigma s)
  for v-prediction (s = sigma_data), 1 for x0 models;
- conditioning goes through ComfyUI's ``convert_cond`` / ``encode_model_conds`` / ``cond_cat``
  like sampling does, so SDXL's pooled/size conditioning is handled by the model itself;
- joint-set training (JeDi): when the pairs carry reference latents and the MODEL went through
  Joint Attention, every forward (policy and reference) is the joint batch the Joint Sampler
  uses: the references, noised with their own noise to the micro-batch's sigma, first, then the
  winners and losers, which attend to the references' tokens. The LoRA then learns the
  preference in the context it will sample in. A micro-batch shares one timestep here (the
  references can only sit at one noise level); their predictions are not part of the loss.

Importing this module needs ComfyUI on the path; the losses themselves are in ``dpo_losses``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint

from ..personalize.focus import blend_focus
from ..personalize.joint_attention import LAYOUT_KEY, JointAttentionPatch, joint_layout
from .dpo_losses import channel_stats_loss, dpo_loss, outside_preservation_loss, patchdpo_paper_loss
from .preference_pairs import PreferencePairs

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
METRICS = ("loss", "accuracy", "margin", "model_winner", "model_loser", "reference_winner", "reference_loser")


class AdapterSwitch:
    """On/off flag shared by a training run's adapter wrappers (off = reference model)."""

    def __init__(self):
        self.enabled = True

    @contextlib.contextmanager
    def off(self):
        """Inside the block the network is the reference model (adapters off)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class SwitchedAdapter(torch.nn.Module):
    """A weight wrapper that applies ``adapter`` only while ``switch.enabled``."""

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.adapter(weight) if self.switch.enabled else weight

    def passive_memory_usage(self) -> int:
        return self.adapter.passive_memory_usage()

    def move_to(self, device) -> int:
        return self.adapter.move_to(device)


class AutogradSafeWeight:
    """Wrapper for weights without an adapter (norm scales) and biases: returns a normal copy.

    Models loaded by a node in ComfyUI hold inference-mode tensors, which autograd refuses to
    save for backward (norm layers save their weight); a copy made outside inference mode is
    allowed. The copies are 1-D and small; other weights pass through their LoRA, whose sum is
    already a normal tensor."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone() if torch.is_inference(weight) else weight

    def passive_memory_usage(self) -> int:
        return 0

    def move_to(self, device) -> int:
        return 0


@dataclass
class LoraOnModel:
    """A cloned ModelPatcher carrying trainable LoRA wrappers."""

    patcher: object
    parameters: dict[str, torch.nn.Parameter]
    switch: AdapterSwitch

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies in ComfyUI's LORA_MODEL layout (``<module>.lora_up.weight``, ...)."""
        return {key: value.detach().to("cpu", copy=True) for key, value in self.parameters.items()}


def attach_lora(model_patcher, rank: int, alpha: float, resume: dict[str, torch.Tensor] | None = None,
                seed: int = 0) -> LoraOnModel:
    """Clone ``model_patcher`` and register a trainable LoRA on every adaptable layer.

    New adapters start as ComfyUI's (up: Kaiming-uniform, down: zeros, so the LoRA starts as a
    no-op) with the up matrices drawn from ``seed``, so training is reproducible.

    A layer too small for ``rank`` (e.g. the UNet's 4-channel output conv) gets its largest
    possible rank, with alpha scaled so its alpha/rank scale stays the same, and a warning.

    Raises:
        ValueError: ``rank`` larger than every layer allows, or a ``resume`` LoRA that matches
            no layer (or a layer of another shape) of this model.
    """
    from comfy.weight_adapter.lora import LoRAAdapter

    patcher = model_patcher.clone()
    switch = AdapterSwitch()
    parameters: dict[str, torch.nn.Parameter] = {}
    matched = 0
    generator = torch.Generator().manual_seed(seed)
    clamped: list[str] = []
    layers = 0
    safe_weight = AutogradSafeWeight()
    for name, module in patcher.model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or weight is None:
            continue
        if getattr(module, "bias", None) is not None:
            patcher.add_weight_wrapper(f"{name}.bias", safe_weight)  # layer_norm saves its bias too
        if weight.ndim < 2:
            patcher.add_weight_wrapper(f"{name}.weight", safe_weight)
            continue
        layers += 1
        adapter = None
        if resume is not None:
            try:
                loaded = LoRAAdapter.load(name, resume, float(resume.get(f"{name}.alpha", alpha)), None)
            except Exception as error:
                raise ValueError(f"the resume LoRA does not fit layer {name}: {error}") from error
            if loaded is not None:
                up, down = loaded.weights[0], loaded.weights[1]
                if up.shape[0] != weight.shape[0] or down.numel() != down.shape[0] * math.prod(weight.shape[1:]):
                    raise ValueError(f"the resume LoRA's layer {name} has another shape than this model's")
                adapter = loaded.to_train()
                matched += 1
        if adapter is None:
            limit = min(weight.shape[0], math.prod(weight.shape[1:]))
            if rank > limit:
                clamped.append(f"{name} ({limit})")
            adapter = LoRAAdapter.create_train(weight, rank=min(rank, limit), alpha=alpha * min(rank, limit) / rank)
            up = torch.empty(adapter.lora_up.weight.shape)
            torch.nn.init.kaiming_uniform_(up, a=5 ** 0.5, generator=generator)
            adapter.lora_up.weight.data.copy_(up)
        adapter = adapter.float()
        for parameter_name, parameter in adapter.named_parameters():
            parameters[f"{name}.{parameter_name}"] = parameter
        patcher.add_weight_wrapper(f"{name}.weight", SwitchedAdapter(adapter, switch))
    if resume is not None and matched == 0:
        raise ValueError("the resume LoRA matches no layer of this model (made for another model family?)")
    if clamped and len(clamped) == layers:
        raise ValueError(f"rank {rank} is larger than every layer of this model allows; use a smaller rank")
    if clamped:
        logging.warning("LoRA rank %d is larger than %d layer(s) allow; they use their largest rank instead: %s",
                        rank, len(clamped), ", ".join(clamped[:5]) + (" ..." if len(clamped) > 5 else ""))
    for key, parameter in parameters.items():
        parameter.requires_grad_(not key.endswith(".alpha"))
    return LoraOnModel(patcher, parameters, switch)


def target_space_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample factor turning x0 errors into errors of what the model predicts."""
    import comfy.model_sampling as sampling

    sigma = sigma.clamp(min=1e-4)
    if isinstance(model_sampling, sampling.V_PREDICTION):
        data = float(getattr(model_sampling, "sigma_data", 1.0))
        return (sigma ** 2 + data ** 2).sqrt() / (sigma * data)
    if isinstance(model_sampling, sampling.X0):
        return torch.ones_like(sigma)
    return 1.0 / sigma  # eps and flow (velocity) models


def conditioning_batches(model, conditionings: list, latent_shape, device) -> list[dict]:
    """Per conditioning, ComfyUI's processed model conds for a batch of one."""
    import comfy.sampler_helpers
    import comfy.samplers

    processed = []
    noise = torch.zeros((1, *latent_shape), device=device)
    for conditioning in conditionings:
        conds = comfy.sampler_helpers.convert_cond(conditioning)[:1]  # area/multi-entry conds: first entry
        conds = comfy.samplers.encode_model_conds(model.extra_conds, conds, noise, device, "positive",
                                                  latent_image=noise, denoise_mask=None, seed=0)
        processed.append({key: value.process_cond(batch_size=1, area=None)
                          for key, value in conds[0]["model_conds"].items()})
    return processed


def batch_kwargs(processed: list[dict], indices: list[int], device) -> dict[str, torch.Tensor]:
    import comfy.samplers

    joined = comfy.samplers.cond_cat([processed[i] for i in indices])
    # clone(): conditioning made under ComfyUI's inference mode cannot be saved for backward.
    return {key: value.to(device).clone() if torch.is_tensor(value) else value for key, value in joined.items()}


def has_joint_attention(patcher) -> bool:
    """Whether the MODEL went through the Joint Attention node (its attn1 patch is on)."""
    transformer_options = patcher.model_options.get("transformer_options", {})
    replaced = transformer_options.get("patches_replace", {}).get("attn1", {})
    return any(isinstance(patch, JointAttentionPatch) for patch in replaced.values())


@dataclass
class MicroBatch:
    """Model inputs for the winners then the losers of some pairs (see ``PairBatcher.batch``).

    ``percents``: the sampling percent each pair was noised at; ``references`` /
    ``reference_sigma``: the noised reference latents of a joint batch (or None).
    """

    percents: torch.Tensor
    x_t: torch.Tensor
    sigma: torch.Tensor
    kwargs: dict
    x0: torch.Tensor
    scale: torch.Tensor
    references: torch.Tensor | None = None
    reference_sigma: torch.Tensor | None = None

    def errors(self, prediction: torch.Tensor) -> torch.Tensor:
        """Per-element squared errors of an x0 ``prediction``, in the model's target space."""
        return (prediction - self.x0) ** 2 * self.scale


class PairBatcher:
    """Turns pair indices into model inputs: scaled latents noised with shared noise and sigma,
    processed conditioning, and the target-space error scale. ``patcher`` must be loaded.

    When the pairs have references and the MODEL has Joint Attention, every prediction is made
    in the joint layout, references first. A MODEL with Joint Attention and pairs without
    references is told there are none (otherwise the patch would take the first image of
    each batch as a reference)."""

    def __init__(self, patcher, pairs: PreferencePairs):
        self.model = patcher.model
        self.device = patcher.load_device
        self.sampling = self.model.model_sampling
        self.transformer_options = patcher.model_options.get("transformer_options", {})
        self.pairs = pairs
        self.winners = self.model.process_latent_in(pairs.winners.float()).to(self.device)
        self.losers = self.model.process_latent_in(pairs.losers.float()).to(self.device)
        # The per-pair maps the losses read, on the device once rather than every micro-batch.
        self.maps = {name: getattr(pairs, name).float().to(self.device)
                     for name in ("winner_weights", "loser_weights", "loser_quality", "loser_complexity")}
        self.references = None
        if has_joint_attention(patcher):
            if pairs.references is not None:
                self.references = self.model.process_latent_in(pairs.references.float()).to(self.device)
            else:
                self.transformer_options = {**self.transformer_options, LAYOUT_KEY: joint_layout(0)}
        self.conds = conditioning_batches(self.model, pairs.conditionings, tuple(self.winners.shape[1:]), self.device)

    @property
    def joint(self) -> bool:
        return self.references is not None

    def batch(self, indices: list[int], percents: torch.Tensor, generator: torch.Generator) -> MicroBatch:
        """Winners then losers of ``indices``, at ``percents`` (one per pair; a joint batch uses
        the first for all)."""
        if self.joint:
            percents = percents[:1].expand(len(indices))
        sigma = torch.tensor([float(self.sampling.percent_to_sigma(float(p))) for p in percents], device=self.device)
        noise = torch.randn((len(indices), *self.winners.shape[1:]), generator=generator).to(self.device)
        x0 = torch.cat([self.winners[indices], self.losers[indices]])
        sigma2 = torch.cat([sigma, sigma])
        x_t = self.sampling.noise_scaling(sigma2.view(-1, 1, 1, 1), torch.cat([noise, noise]), x0)
        kwargs = batch_kwargs(self.conds, [int(self.pairs.condition_index[i]) for i in indices] * 2, self.device)
        scale = target_space_scale(self.sampling, sigma2).view(-1, 1, 1, 1) ** 2
        batch = MicroBatch(percents, x_t, sigma2, kwargs, x0, scale)
        if self.joint:
            reference_noise = torch.randn(self.references.shape, generator=generator).to(self.device)
            batch.reference_sigma = sigma[:1].expand(self.references.shape[0])
            batch.references = self.sampling.noise_scaling(batch.reference_sigma.view(-1, 1, 1, 1), reference_noise,
                                                           self.references)
        return batch

    def predict(self, x_t, sigma, kwargs, batch: MicroBatch | None = None) -> torch.Tensor:
        """The model's x0 prediction of ``x_t`` (in a joint batch with ``batch``'s references)."""
        if batch is None or batch.references is None:
            return self.model.apply_model(x_t, sigma, transformer_options=self.transformer_options, **kwargs).float()
        count = batch.references.shape[0]
        joint_x = torch.cat([batch.references, x_t])
        joint_sigma = torch.cat([batch.reference_sigma, sigma])
        # The references take the conditioning of the micro-batch's first image.
        joint_kwargs = {key: torch.cat([value[:1].expand(count, *value.shape[1:]), value])
                        if torch.is_tensor(value) and value.shape[0] == x_t.shape[0] else value
                        for key, value in kwargs.items()}
        options = {**self.transformer_options, LAYOUT_KEY: joint_layout(count), "cond_or_uncond": [0],
                   "sigmas": joint_sigma}
        return self.model.apply_model(joint_x, joint_sigma, transformer_options=options, **joint_kwargs).float()[count:]


@torch.no_grad()
def implicit_accuracy(lora: LoraOnModel, pairs: PreferencePairs, seed: int = 0, repeats: int = 4,
                      timestep_start: float = 0.0, timestep_end: float = 1.0) -> float:
    """Share of (pair, timestep, noise) draws where the LoRA model prefers the winner more than
    the reference does (DPO's implicit reward: inside > 0; exact ties count one half).

    Uses plain (unweighted) errors, so numbers are comparable across loss modes.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([lora.patcher], force_full_load=True)
    batcher = PairBatcher(lora.patcher, pairs)
    generator = torch.Generator().manual_seed(seed)
    config = DPOTrainingConfig(timestep_start=timestep_start, timestep_end=timestep_end)
    score = total = 0.0
    indices = list(range(len(pairs)))
    with torch.inference_mode(False):
        for _ in range(repeats):
            batch = batcher.batch(indices, sample_percents(len(indices), config, generator), generator)

            def errors():
                return batch.errors(batcher.predict(batch.x_t, batch.sigma, batch.kwargs, batch)).mean(dim=(1, 2, 3))

            with lora.switch.off():
                reference = errors()
            policy = errors()
            count = len(indices)
            inside = -((policy[:count] - policy[count:]) - (reference[:count] - reference[count:]))
            score += float((inside > 0).sum() + 0.5 * (inside == 0).sum())
            total += count
    return score / total


@dataclass
class DPOTrainingConfig:
    loss_mode: str = "patch_dpo"
    beta: float = 5000.0
    steps: int = 100
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
    gradient_checkpointing: bool = False
    stats_weight: float = 0.1  # hg_dpo colour-statistics term
    focus_gate: tuple[float, float, float] = (0.3, 0.7, 1.0)  # gate_start, gate_end, complexity weight
    preserve_outside: float = 0.0  # patch_dpo / focus_dpo: anchor low-weight cells to the reference


@dataclass
class DPOTrainingResult:
    lora: LoraOnModel
    history: dict[str, list[float]] = field(default_factory=dict)
    steps_done: int = 0


class NonFiniteLoss(FloatingPointError):
    pass


def sample_percents(count: int, config: DPOTrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """Timestep percents in [start, end) (0 = noisiest), uniform or logit-normal."""
    start, end = config.timestep_start, min(config.timestep_end, 0.999)
    if config.timestep_sampling == "logit_normal":
        unit = torch.sigmoid(torch.randn(count, generator=generator))
    else:
        unit = torch.rand(count, generator=generator)
    return start + (end - start) * unit


def curriculum_pool(stages: dict[str, list[int]], count: int, mode: str, step: int, steps: int) -> list[int]:
    """Pair indices to draw from at ``step`` (``stages``: ``PreferencePairs.difficulty_indices``):
    HG-DPO goes easy -> normal -> hard in equal thirds of the run (a stage with no pairs falls
    back to all pairs); other modes use every one of the ``count`` pairs."""
    everything = list(range(count))
    if mode != "hg_dpo":
        return everything
    stage = ("easy", "normal", "hard")[min(2, 3 * step // max(steps, 1))]
    return stages.get(stage) or everything


def train_dpo_lora(model_patcher, pairs: PreferencePairs, config: DPOTrainingConfig,
                   resume: dict[str, torch.Tensor] | None = None,
                   on_step: Callable[[int, dict[str, float], LoraOnModel], None] | None = None) -> DPOTrainingResult:
    """Train a LoRA on ``model_patcher`` (never modified) from ``pairs``.

    ``on_step(step, metrics, lora)`` runs after every optimiser step (progress, previews,
    checkpoints, interrupts: it may raise). Raises ``NonFiniteLoss`` on a NaN/inf loss, before
    the bad update is applied.
    """
    pairs.validate()
    latent_format = model_patcher.model.latent_format
    if pairs.latent_channels != latent_format.latent_channels or pairs.winners.shape[1] != latent_format.latent_channels:
        raise ValueError(f"the pairs were encoded by a VAE with {pairs.latent_channels}-channel latents but this "
                         f"model expects {latent_format.latent_channels}; build the pairs with this model's VAE")
    # ComfyUI runs nodes under inference mode; adapters, inputs and the graph must be normal tensors.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(model_patcher, pairs, config, resume, on_step)


def _train(model_patcher, pairs, config, resume, on_step) -> DPOTrainingResult:
    import comfy.model_management

    lora = attach_lora(model_patcher, config.rank, config.alpha, resume, seed=config.seed)
    patcher = lora.patcher
    if config.dtype != torch.float32:
        patcher.set_model_compute_dtype(config.dtype)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    device = patcher.load_device

    joint = has_joint_attention(patcher)
    if pairs.references is not None and not joint:
        logging.warning("The pairs carry %d reference latents but the MODEL has no Joint Attention; training "
                        "without them (connect the MODEL through Joint Attention for joint-set training).",
                        pairs.references.shape[0])
    elif joint and pairs.references is None:
        logging.warning("The MODEL has Joint Attention but the pairs carry no references; it is off while "
                        "training (give the pair builder the reference photos for joint-set training).")
    batcher = PairBatcher(patcher, pairs)
    if batcher.joint:
        logging.info("Training in the joint batch with %d reference latents.", pairs.references.shape[0])

    trainable = [p for p in lora.parameters.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    history = {name: [] for name in METRICS}
    autocast = torch.autocast(device_type=device.type, dtype=config.dtype, enabled=config.dtype != torch.float32)
    predict = batcher.predict

    def policy(batch: MicroBatch):
        x_t, sigma, kwargs = batch.x_t, batch.sigma, batch.kwargs
        if not config.gradient_checkpointing:
            return predict(x_t, sigma, kwargs, batch)
        # Winner and loser halves are recomputed one at a time in backward, so only one image's
        # activations are alive at once (one extra forward of compute; a joint batch's
        # references go with each half).
        half = x_t.shape[0] // 2
        outputs = []
        for part in (slice(0, half), slice(half, None)):
            part_kwargs = {k: v[part] if torch.is_tensor(v) and v.shape[0] == x_t.shape[0] else v for k, v in kwargs.items()}
            outputs.append(torch.utils.checkpoint.checkpoint(
                lambda x, s, kw=part_kwargs: predict(x, s, kw, batch), x_t[part], sigma[part], use_reentrant=False))
        return torch.cat(outputs)

    steps_done = 0
    stages = pairs.difficulty_indices()
    try:
        for step in range(config.steps):
            pool = curriculum_pool(stages, len(pairs), config.loss_mode, step, config.steps)
            totals = {name: 0.0 for name in METRICS}
            for _ in range(config.grad_accumulation):
                picks = torch.randint(len(pool), (config.batch_size,), generator=generator)
                indices = [pool[i] for i in picks.tolist()]
                batch = batcher.batch(indices, sample_percents(len(indices), config, generator), generator)
                terms = _loss_terms(config, batcher, indices, batch, lora.switch, policy, autocast, device)
                loss = terms.pop("loss")
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"the loss became {float(loss)} at step {step + 1}")
                (loss / config.grad_accumulation).backward()
                totals["loss"] += float(loss.detach()) / config.grad_accumulation
                for name, value in terms.items():
                    totals[name] += float(value) / config.grad_accumulation
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done = step + 1
            for name in METRICS:
                history[name].append(totals[name])
            if on_step is not None:
                on_step(steps_done, totals, lora)
    finally:
        # Also on Cancel or an error: gradients and optimiser state go, the cache is emptied.
        for parameter in lora.parameters.values():
            parameter.requires_grad_(False)
            parameter.grad = None
        del optimizer
        comfy.model_management.soft_empty_cache()
    return DPOTrainingResult(lora=lora, history=history, steps_done=steps_done)


def _loss_terms(config, batcher: PairBatcher, indices, micro: MicroBatch, switch: AdapterSwitch, policy, autocast,
                device) -> dict[str, torch.Tensor]:
    """One micro-batch's loss and diagnostics for the configured mode."""
    batch = len(indices)
    mode = config.loss_mode
    maps = {name: value[indices] for name, value in batcher.maps.items()}
    with autocast:
        if mode == "patchdpo_paper":
            reference = None
        else:
            with switch.off(), torch.no_grad():
                reference = batcher.predict(micro.x_t, micro.sigma, micro.kwargs, micro)
        prediction = policy(micro)
    errors = micro.errors(prediction)
    model_w, model_l = errors[:batch], errors[batch:]
    zero = torch.zeros((), device=device)
    if mode == "patchdpo_paper":
        loss = patchdpo_paper_loss(model_w, model_l, maps["winner_weights"], maps["loser_quality"])
        return {"loss": loss, "accuracy": zero, "margin": zero, "model_winner": model_w.mean().detach(),
                "model_loser": model_l.mean().detach(), "reference_winner": zero, "reference_loser": zero}
    reference_errors = micro.errors(reference)
    weights_w = weights_l = None
    if mode == "patch_dpo":
        weights_w, weights_l = maps["winner_weights"], maps["loser_weights"]
    elif mode == "focus_dpo":
        # FocusDPO's pairs are pixel-aligned, so both images take the loser's focus map.
        gate_start, gate_end, weight = config.focus_gate
        focus = blend_focus(1.0 - maps["loser_quality"], maps["loser_complexity"], micro.percents.to(device),
                            gate_start, gate_end, weight)
        weights_w = weights_l = focus + 1e-3
    terms = dpo_loss(model_w, model_l, reference_errors[:batch], reference_errors[batch:], config.beta,
                     weights_w, weights_l)
    loss = terms.loss
    if weights_w is not None and config.preserve_outside > 0:
        preserve = outside_preservation_loss(prediction, reference, torch.cat([weights_w, weights_l]), micro.scale)
        loss = loss + 0.5 * config.beta * config.preserve_outside * preserve
    if mode == "hg_dpo" and config.stats_weight > 0:
        # What the policy makes of the generated (loser) image should carry the real photo's
        # colour statistics.
        loss = loss + config.stats_weight * channel_stats_loss(prediction[batch:], micro.x0[:batch])
    return {"loss": loss, "accuracy": terms.accuracy, "margin": terms.margin,
            "model_winner": terms.model_winner, "model_loser": terms.model_loser,
            "reference_winner": terms.reference_winner, "reference_loser": terms.reference_loser}
