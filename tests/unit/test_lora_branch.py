"""The forward-path LoRA branch and per-block checkpointing, on tiny tensors: the branch against
hand-computed values and against the layer with the merged weight W + s·BA; block discovery
against a hand-drawn module tree; checkpointed gradients against plain ones; frozen aliases of
inference tensors."""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from prefpersonalize.trainers.checkpointing import (
    checkpointed_call,
    checkpointed_in_place_call,
    frozen_alias,
    modules_at_depth,
    saving_copies,
)
from prefpersonalize.trainers.lora_branch import ConvGeometry, lora_delta


def test_linear_branch_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    down = torch.tensor([[1.0, 1.0]])  # rank 1: down(x) = 3
    up = torch.tensor([[2.0], [0.0]])  # up(3) = (6, 0)
    assert torch.equal(lora_delta(x, down, up, 0.5), torch.tensor([[3.0, 0.0]]))


def test_linear_branch_is_the_merged_weight_difference():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 6, generator=generator), torch.randn(4, 6, generator=generator)
    down, up = torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator)
    merged = F.linear(x, weight + 0.25 * up @ down)
    torch.testing.assert_close(F.linear(x, weight) + lora_delta(x, down, up, 0.25), merged)


def test_conv_branch_is_the_merged_weight_difference():
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, 9, 9, generator=generator), torch.randn(5, 3, 3, 3, generator=generator)
    down, up = torch.randn(2, 3 * 9, generator=generator), torch.randn(5, 2, generator=generator)
    geometry = ConvGeometry(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    merged = F.conv2d(x, weight + 0.5 * (up @ down).reshape(weight.shape), stride=2, padding=1)
    base = F.conv2d(x, weight, stride=2, padding=1)
    torch.testing.assert_close(base + lora_delta(x, down, up, 0.5, geometry), merged)


def test_branch_follows_the_input_dtype():
    x = torch.randn(1, 4, dtype=torch.bfloat16)
    assert lora_delta(x, torch.randn(2, 4), torch.randn(3, 2), 1.0).dtype == torch.bfloat16


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.SiLU())
        self.skip = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x) + self.skip(x)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(2, 2)  # a single layer at depth 2: never checkpointed
        self.blocks = torch.nn.ModuleList([Block(), torch.nn.Sequential(Block())])

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_depth_counts_modules_not_containers():
    net = Net()
    assert modules_at_depth(net, 1) == [net]
    first, second = net.blocks[0], net.blocks[1][0]
    assert modules_at_depth(net, 2) == [first, second]
    # Depth 3: the blocks' own children that have children; Sequential does not count, and
    # single layers (Linear, SiLU) are left out.
    assert modules_at_depth(net, 3) == []


def test_checkpointed_gradients_match_plain_ones():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 2)
    plain = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    originals = [block.forward for block in modules_at_depth(net, 2)]
    for block, original in zip(modules_at_depth(net, 2), originals, strict=True):
        block.forward = lambda *args, original=original, **kwargs: checkpointed_call(original, *args, **kwargs)
    checkpointed = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # without grad the call passes straight through
        assert torch.equal(checkpointed_call(torch.neg, x), -x)


class InPlaceBlock(torch.nn.Module):
    """Updates its input in place twice after norms saved it, as Flux's blocks do."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4, elementwise_affine=False)
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0):
        x += self.first(self.norm(x)) * scale
        x += self.second(self.norm(x))
        return x

    def out_of_place(self, x):
        x = x + self.first(self.norm(x))
        return x + self.second(self.norm(x))


def gradients(loss, inputs):
    """``loss.backward()`` (the reentrant checkpoint refuses ``autograd.grad``), then the grads."""
    for tensor in inputs:
        tensor.grad = None
    loss.backward()
    return [tensor.grad.clone() for tensor in inputs]


def test_in_place_blocks_train_plain_and_checkpointed():
    torch.manual_seed(0)
    block, x = InPlaceBlock(), torch.randn(3, 4, requires_grad=True)
    inputs = [x, *block.parameters()]
    expected = gradients(block.out_of_place(x).square().sum(), inputs)
    with pytest.raises(RuntimeError, match="inplace operation"):  # what the guards are for
        gradients(block(x * 1).square().sum(), inputs)
    guarded = gradients(saving_copies(block.forward)(x * 1).square().sum(), inputs)
    before = x * 1
    checkpointed = gradients(checkpointed_in_place_call(block.forward, before, scale=1.0).square().sum(), inputs)
    for want, got_plain, got_checkpointed in zip(expected, guarded, checkpointed, strict=True):
        torch.testing.assert_close(got_plain, want)
        torch.testing.assert_close(got_checkpointed, want)
    torch.testing.assert_close(before, x)  # the checkpointed block ran on a copy of its input
    # copying the inputs alone (no saved copies in the recomputation) is silently wrong
    copied = torch.utils.checkpoint.checkpoint(lambda a: block(a.clone()), x * 1, use_reentrant=False)
    wrong = gradients(copied.square().sum(), inputs)
    assert (wrong[0] - expected[0]).abs().max() > 1e-3
    # inputs without grad (the first block): the block's own parameters still get their gradients
    constant = x.detach()
    parameters = list(block.parameters())
    want = gradients(block.out_of_place(constant).square().sum(), parameters)
    got = gradients(checkpointed_in_place_call(block.forward, constant.clone()).square().sum(), parameters)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert torch.equal(checkpointed_in_place_call(block.forward, x.detach().clone()), block.out_of_place(x))


def test_frozen_alias_of_an_inference_weight_is_saved_by_autograd_without_a_copy():
    with torch.inference_mode():
        weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))[1:]  # a view: offset 3
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        F.linear(x, weight).sum().backward()
    alias = frozen_alias(weight)
    assert alias.data_ptr() == weight.data_ptr() and alias.shape == weight.shape and alias.stride() == weight.stride()
    assert not torch.is_inference(alias) and not alias.requires_grad
    F.linear(x, alias).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, 3))
