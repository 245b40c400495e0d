"""The forward-path LoRA branch and per-block checkpointing, on tiny tensors: the branch against
hand-computed values and against the layer with the merged weight W + s·BA; block discovery
against a hand-drawn module tree; checkpointed gradients against plain ones."""

import torch
import torch.nn.functional as F

from pack.pure.checkpointing import checkpointed_call, modules_at_depth
from pack.pure.lora_branch import ConvGeometry, lora_delta


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
