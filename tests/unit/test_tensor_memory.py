"""LiveTensorBytes on tensors: what ops allocate counts while it lives, views and in-place
results do not, and a FakeTensorMode run counts the same bytes as the real one."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from prefpersonalize.pure.tensor_memory import LiveTensorBytes

MIB = 2**20


def step(x: torch.Tensor) -> torch.Tensor:
    """From a 4 MiB ``x``: three new 4 MiB results, at most three alive at once."""
    flat = x.view(-1)  # a view of a storage made before: nothing new
    a = flat.view(1024, 1024) * 2  # 4 MiB
    b = a + 1  # 4 MiB: 8 alive
    a.add_(1)  # in place: nothing new
    view = b.view(-1)  # a view: nothing new
    del a  # 4 alive
    return view.sin() + b.view(-1)  # sin: 8 alive; the sum: 12, then sin's result is freed


def test_live_tensor_bytes_counts_what_ops_allocate_not_views_or_in_place_results():
    x = torch.zeros(1024, 1024)  # made before: not counted
    live = LiveTensorBytes()
    with live:
        result = step(x)
    assert live.peak == 12 * MIB
    assert live.live == 4 * MIB  # the result; b went with step's frame
    del result
    assert live.live == 0


def test_a_fake_run_counts_what_the_real_run_allocates():
    x = torch.zeros(1024, 1024)
    real = LiveTensorBytes()
    with real:
        step(x)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = LiveTensorBytes(fake_mode)
    blind = LiveTensorBytes()  # counts real tensors only: sees nothing of the fake run
    with blind, fake_mode, fake:
        step(x)
    assert fake.peak == real.peak == 12 * MIB
    assert blind.peak == 0
