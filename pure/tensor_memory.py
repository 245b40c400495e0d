"""Tensor memory counted as an allocator sees it: the bytes of the storages that ops create and
that are still alive, now and at the peak, on real tensors or on the fakes of a
``FakeTensorMode`` run (which allocate nothing, so a step can be measured before it runs)."""

from __future__ import annotations

import functools
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


def has_storage(value) -> bool:
    return isinstance(value, (torch.Tensor, torch.UntypedStorage))


def storage_key(value: torch.Tensor | torch.UntypedStorage) -> int:
    """The identity of a tensor's (or a storage's) memory, shared by its views."""
    storage = value if isinstance(value, torch.UntypedStorage) else value.untyped_storage()
    return storage._cdata


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create while it is on, live at once: ``live``
    now and ``peak`` at the most (what CUDA's allocator reports as allocated). Storages made
    before it (the weights, the inputs) are not counted, nor results on an input's storage
    (views, in-place ops). ``fake_mode``: count the fake tensors of that ``FakeTensorMode``'s
    run instead of real ones (each kind is blind to the other); a real input stands for its fake
    there, so a view of a weight made before is no allocation either."""

    def __init__(self, fake_mode: FakeTensorMode | None = None):
        super().__init__()
        self.fake_mode = fake_mode
        self.live = 0
        self.peak = 0
        self.storages = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # A result on an input's storage (a view, an in-place op, ``set_``) allocated nothing.
        inputs = {storage_key(value) for value in self.as_run(tree_leaves((args, kwargs))) if has_storage(value)}
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor) and isinstance(value, FakeTensor) == (self.fake_mode is not None):
                if storage_key(value) not in inputs:
                    self.track(value.untyped_storage())
        return result

    def as_run(self, values: list) -> list:
        """``values`` as the run sees them: in a fake run, real tensors as their fakes."""
        if self.fake_mode is None:
            return values
        return [
            self.fake_mode.from_tensor(value)
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
            else value
            for value in values
        ]

    def track(self, storage: torch.UntypedStorage) -> None:
        if storage in self.storages:
            return
        size = storage.nbytes()
        # The weak reference's callback runs when the storage is freed.
        self.storages[storage] = weakref.ref(storage, functools.partial(self.free, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def free(self, size: int, _reference) -> None:
        self.live -= size
