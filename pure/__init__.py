"""The pack's algorithms in plain torch: tensors in, tensors out.

The rule of this layer: nothing here imports ComfyUI (``comfy``, ``comfy_api``,
``comfy_extras``, ``folder_paths``, ...) or the layers above it (``nodes``, ``comfy_glue``);
``tests/unit/test_layers.py`` checks it. What ComfyUI provides (attention kernels, a VAE's
encode) is passed in as a callable, so every function here is tested on tensors alone.
Problems a user can fix are raised as ``errors.InputError``.
"""
