"""The training side of the pack: the DPO LoRA loop with its options and progress reporter, LoRA
adapters on a ModelPatcher, pair batching, the losses and timestep sampling, LoRA file layouts,
the headless runner and its job files, and the patch-quality estimator's self-supervised tuning.

Two kinds of module live here (``tests/unit/test_layers.py`` checks both):
- algorithms in plain torch, which import nothing of ComfyUI and no glue module of this folder:
  ``losses``, ``timesteps``, ``lora_branch``, ``checkpointing``, ``estimator``;
- training glue on ComfyUI's core (``comfy.*``) and the run's plumbing: ``loop``, ``options``,
  ``progress``, ``lora_adapters``, ``pair_batches``, ``lora_files``, ``jobs``, ``headless``. Like
  ``comfy_glue/`` they never import the node API.
"""
