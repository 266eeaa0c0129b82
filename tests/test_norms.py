"""bnbook.norms: Batch Renormalization, Weight Standardization and SkipInit blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbook.norms import BatchRenorm2d, SkipInitBlock, WSConv2d, residual_cnn


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Batch Renormalization
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (2, 5, 3, 2)])
def test_batch_renorm_without_correction_is_batch_norm(shape):
    brn = BatchRenorm2d(shape[1], rmax=1.0, dmax=0.0, momentum=0.1).double()
    bn = nn.BatchNorm2d(shape[1], momentum=0.1).double()
    with torch.no_grad():
        for m in (brn, bn):
            m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for step in range(3):
        x = _x(*shape, seed=step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = brn(x), bn(x2)
        torch.testing.assert_close(y, y2)
        dy = _x(*shape, seed=10 + step)
        y.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(brn.running_mean, bn.running_mean)
        torch.testing.assert_close(brn.running_var, bn.running_var)
    brn.eval()
    bn.eval()
    x = _x(*shape, seed=99)
    torch.testing.assert_close(brn(x), bn(x))


def test_batch_renorm_without_clipping_outputs_the_inference_formula():
    brn = BatchRenorm2d(3, rmax=1e6, dmax=1e6, momentum=0.0).double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        brn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = _x(4, 3, 5, 5)
    y_train = brn(x)
    brn.eval()
    torch.testing.assert_close(y_train, brn(x))


def test_batch_renorm_treats_r_and_d_as_constants():
    # With r, d constant, the gradient w.r.t. x is batch norm's gradient times r.
    brn = BatchRenorm2d(2, rmax=10.0, dmax=10.0, momentum=0.0).double()
    with torch.no_grad():
        brn.running_var.fill_(9.0)
    bn = nn.BatchNorm2d(2, momentum=0.0, eps=1e-5).double()
    x = _x(6, 2, 3, 3).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = _x(6, 2, 3, 3, seed=1)
    brn(x).backward(dy)
    bn(x2).backward(dy)
    std = torch.sqrt(x.detach().var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    r = (std / torch.sqrt(torch.tensor(9.0 + 1e-5, dtype=torch.float64))).view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, x2.grad * r)


def test_batch_renorm_errors():
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="dmax must be >= 0"):
        BatchRenorm2d(3, dmax=-1)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        BatchRenorm2d(3)(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm2d(3)(torch.zeros(1, 3, 1, 1))


# --------------------------------------------------------------------------- #
# Weight Standardization
# --------------------------------------------------------------------------- #
def test_ws_conv_standardizes_each_output_channel():
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(torch.arange(5.0).view(5, 1, 1, 1))
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        w.std(dim=(1, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0
    )


def test_ws_conv_equals_a_plain_conv_with_the_standardized_weight_and_gradients_flow():
    torch.manual_seed(0)
    conv = WSConv2d(2, 4, 3, padding=1, bias=True).double()
    x = _x(3, 2, 6, 6)
    ref = nn.functional.conv2d(x, conv.standardized_weight(), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)
    assert torch.autograd.gradcheck(
        lambda w: nn.functional.conv2d(x[:1, :, :3, :3], _standardize(w), padding=1),
        conv.weight.detach().clone().requires_grad_(True),
    )


def _standardize(w):
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    return (w - mean) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)


def test_ws_conv_output_ignores_per_channel_weight_shift_and_scale():
    torch.manual_seed(0)
    conv = WSConv2d(2, 3, 3, bias=False, ws_eps=0.0).double()
    x = _x(2, 2, 5, 5)
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([2.0, 0.1, 5.0]).view(3, 1, 1, 1)).add_(3.0)
    torch.testing.assert_close(conv(x), y)


# --------------------------------------------------------------------------- #
# SkipInit
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("norm", ["none", "bn"])
def test_skipinit_block_is_the_identity_on_nonnegative_inputs_at_init(norm):
    torch.manual_seed(0)
    block = SkipInitBlock(4, norm=norm)
    x = torch.rand(2, 4, 5, 5)
    torch.testing.assert_close(block(x), x)
    assert block.alpha.requires_grad and float(block.alpha.detach()) == 0.0


def test_skipinit_alpha_receives_a_gradient_and_plain_block_is_fixed_at_one():
    torch.manual_seed(0)
    block = SkipInitBlock(4)
    block(torch.rand(2, 4, 5, 5)).sum().backward()
    assert block.alpha.grad is not None and float(block.alpha.grad) != 0.0
    plain = SkipInitBlock(4, skipinit=False)
    assert "alpha" not in dict(plain.named_parameters()) and float(plain.alpha) == 1.0


def test_deep_skipinit_net_keeps_the_stem_output_at_init():
    torch.manual_seed(0)
    net = residual_cnn(depth=20, channels=8)
    x = torch.randn(3, 1, 8, 8)
    stem = net[:3](x)
    torch.testing.assert_close(net[:23](x), stem)
    assert net(x).shape == (3, 10)


def test_residual_cnn_errors():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        residual_cnn(0)
    with pytest.raises(ValueError, match="unknown normalizer"):
        residual_cnn(2, norm="xx")


# --------------------------------------------------------------------------- #
# Converting existing models
# --------------------------------------------------------------------------- #
def test_to_batch_renorm_replaces_every_batch_norm_and_keeps_the_eval_function():
    from bnbook.models import cnn
    from bnbook.norms import to_batch_renorm

    torch.manual_seed(0)
    model = cnn(norm="bn", channels=(4, 8))
    model.train()
    model(torch.randn(16, 1, 8, 8))  # move the running statistics away from 0 and 1
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    to_batch_renorm(model, rmax=2.0, dmax=1.0)
    kinds = [type(m) for m in model.modules()]
    assert nn.BatchNorm2d not in kinds and kinds.count(BatchRenorm2d) == 2
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="no nn.BatchNorm2d"):
        to_batch_renorm(model)


def test_to_weight_standardized_replaces_convs_and_standardizes_them():
    from bnbook.models import cnn
    from bnbook.norms import to_weight_standardized

    torch.manual_seed(0)
    model = cnn(norm="gn", channels=(4, 8))
    w0 = model[0].weight.detach().clone()
    to_weight_standardized(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(isinstance(c, WSConv2d) for c in convs)
    torch.testing.assert_close(convs[0].weight, w0)
    x = torch.randn(3, 1, 8, 8)
    ref = nn.functional.conv2d(x, _standardize(w0), padding=1)
    torch.testing.assert_close(convs[0](x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        to_weight_standardized(nn.Sequential(nn.Linear(2, 2)))
