"""bnbook.fold against torch.nn.utils.fusion and against the unfolded modules."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnbook import nn as bnn
from bnbook.fold import (
    fold_batch_norms,
    fold_conv_bn,
    fold_linear_bn,
    foldable_pairs,
    is_batch_norm,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TORCH_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BNBOOK_BNS = {1: bnn.BatchNorm1d, 2: bnn.BatchNorm2d, 3: bnn.BatchNorm3d}


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    """Give a batch norm non-trivial running statistics and affine parameters."""
    c = bn.num_features
    kw = {"generator": gen, "dtype": bn.running_mean.dtype}
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, **kw))
        bn.running_var.copy_(torch.rand(c, **kw) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, **kw))
            bn.bias.copy_(torch.randn(c, **kw))
    return bn.eval()


def assert_close(a, b, dtype):
    err = (a - b).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bn_kind", ["torch", "bnbook"])
def test_fold_conv_bn_matches_torch(dtype, dims, conv_bias, affine, bn_kind):
    gen = torch.Generator().manual_seed(dims)
    conv = CONVS[dims](3, 6, 3, padding=1, bias=conv_bias, dtype=dtype).eval()
    bns = TORCH_BNS if bn_kind == "torch" else BNBOOK_BNS
    bn = randomize_bn(bns[dims](6, affine=affine, dtype=dtype), gen)
    x = torch.randn(2, 3, *([5] * dims), generator=gen, dtype=dtype)
    folded = fold_conv_bn(conv, bn)
    assert type(folded) is CONVS[dims]
    assert folded.bias is not None and not folded.training
    assert folded.weight.dtype == dtype and folded.bias.dtype == dtype
    with torch.no_grad():
        expected = bn(conv(x))
        assert_close(folded(x), expected, dtype)
        # torch's fuser reads bn.weight/bias, so it handles affine=False as well
        fused = fuse_conv_bn_eval(conv, bn)
        assert_close(folded(x), fused(x), dtype)
        assert_close(folded.weight, fused.weight, dtype)
        assert_close(folded.bias, fused.bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("linear_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, bnn.BatchNorm1d])
def test_fold_linear_bn_matches_torch(dtype, linear_bias, affine, bn_cls):
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(7, 4, bias=linear_bias, dtype=dtype).eval()
    bn = randomize_bn(bn_cls(4, affine=affine, dtype=dtype), gen)
    x = torch.randn(9, 7, generator=gen, dtype=dtype)
    folded = fold_linear_bn(linear, bn)
    assert type(folded) is nn.Linear and folded.bias is not None
    with torch.no_grad():
        assert_close(folded(x), bn(linear(x)), dtype)
        if affine:  # torch's fuse_linear_bn_eval requires bn.weight
            fused = fuse_linear_bn_eval(linear, bn)
            assert_close(folded(x), fused(x), dtype)
            assert_close(folded.weight, fused.weight, dtype)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"groups": 2},
        {"groups": 6, "stride": 2},  # depthwise
        {"dilation": 2, "padding": 2},
        {"padding": "same", "padding_mode": "reflect"},
    ],
)
def test_fold_conv_hyperparameters(kwargs):
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 12, 3, **kwargs).eval()
    bn = randomize_bn(nn.BatchNorm2d(12), gen)
    folded = fold_conv_bn(conv, bn)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(folded, attr) == getattr(conv, attr)
    x = torch.randn(2, 6, 9, 9, generator=gen)
    with torch.no_grad():
        assert_close(folded(x), bn(conv(x)), torch.float32)
        assert_close(folded(x), fuse_conv_bn_eval(conv, bn)(x), torch.float32)


def test_fold_keeps_inputs_untouched_and_requires_grad():
    conv = nn.Conv2d(2, 3, 1).eval()
    bn = randomize_bn(nn.BatchNorm2d(3), torch.Generator().manual_seed(0))
    before = copy.deepcopy((conv.state_dict(), bn.state_dict()))
    conv.weight.requires_grad_(False)
    folded = fold_conv_bn(conv, bn)
    for sd, old in zip((conv.state_dict(), bn.state_dict()), before, strict=True):
        for k in sd:
            assert torch.equal(sd[k], old[k])
    assert not folded.weight.requires_grad
    assert folded.weight.data_ptr() != conv.weight.data_ptr()


def test_fold_half_precision_is_close_to_float64():
    torch.manual_seed(4)  # the conv's initial weights come from the global generator
    gen = torch.Generator().manual_seed(4)
    conv16 = nn.Conv2d(3, 8, 3, dtype=torch.float64).eval().to(torch.bfloat16)
    bn16 = randomize_bn(nn.BatchNorm2d(8, dtype=torch.float64), gen).to(torch.bfloat16)
    # The same bfloat16 inputs folded in float64: what a single final rounding must match.
    exact = fold_conv_bn(copy.deepcopy(conv16).double(), copy.deepcopy(bn16).double())
    folded16 = fold_conv_bn(conv16, bn16)
    assert folded16.weight.dtype == torch.bfloat16
    rel = (folded16.weight.double() - exact.weight).abs() / exact.weight.abs().clamp_min(1e-3)
    assert rel.max() <= 2**-8  # one bfloat16 rounding (8 significant bits), not several


# ---------------------------------------------------------------- errors


def test_training_mode_is_rejected():
    conv, bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="BatchNorm2d is in training mode"):
        fold_conv_bn(conv.eval(), bn.train())
    with pytest.raises(ValueError, match="Conv2d is in training mode"):
        fold_conv_bn(conv.train(), bn.eval())
    with pytest.raises(ValueError, match="training mode"):
        fold_linear_bn(nn.Linear(2, 3).eval(), nn.BatchNorm1d(3).train())
    with pytest.raises(ValueError, match="Linear is in training mode"):
        fold_linear_bn(nn.Linear(2, 3).train(), nn.BatchNorm1d(3).eval())


def test_mismatched_channels_are_rejected():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) cannot follow Conv2d with 3"):
        fold_conv_bn(nn.Conv2d(2, 3, 1).eval(), nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match=r"cannot follow Linear with 3"):
        fold_linear_bn(nn.Linear(2, 3).eval(), bnn.BatchNorm1d(5).eval())


def test_mismatched_rank_is_rejected():
    with pytest.raises(ValueError, match="expects 2D or 3D inputs but Conv2d outputs 4D"):
        fold_conv_bn(nn.Conv2d(2, 3, 1).eval(), nn.BatchNorm1d(3).eval())
    with pytest.raises(ValueError, match="expects 4D inputs but Conv1d outputs 3D"):
        fold_conv_bn(nn.Conv1d(2, 3, 1).eval(), bnn.BatchNorm2d(3).eval())
    with pytest.raises(ValueError, match="does not accept the 2-D output"):
        fold_linear_bn(nn.Linear(2, 3).eval(), nn.BatchNorm2d(3).eval())


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnn.BatchNorm2d])
def test_bn_without_running_stats_is_rejected(bn_cls):
    bn = bn_cls(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_conv_bn(nn.Conv2d(2, 3, 1).eval(), bn)


def test_wrong_module_types_are_rejected():
    with pytest.raises(TypeError, match="transposed convolutions are not supported"):
        fold_conv_bn(nn.ConvTranspose2d(2, 3, 1).eval(), nn.BatchNorm2d(3).eval())
    with pytest.raises(TypeError, match="expected nn.Conv1d, Conv2d or Conv3d, got Linear"):
        fold_conv_bn(nn.Linear(2, 3).eval(), nn.BatchNorm1d(3).eval())
    with pytest.raises(TypeError, match="expected a BatchNorm module, got GroupNorm"):
        fold_conv_bn(nn.Conv2d(2, 4, 1).eval(), nn.GroupNorm(2, 4).eval())
    with pytest.raises(TypeError, match="expected a BatchNorm module, got InstanceNorm2d"):
        fold_conv_bn(nn.Conv2d(2, 4, 1).eval(), nn.InstanceNorm2d(4, affine=True).eval())
    with pytest.raises(TypeError, match="expected nn.Linear, got Conv1d"):
        fold_linear_bn(nn.Conv1d(2, 3, 1).eval(), nn.BatchNorm1d(3).eval())

    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="ScaledConv overrides forward"):
        fold_conv_bn(ScaledConv(2, 3, 1).eval(), nn.BatchNorm2d(3).eval())


def test_lazy_modules_before_first_forward_are_rejected():
    with pytest.raises(ValueError, match="lazy and uninitialized"):
        fold_conv_bn(nn.LazyConv2d(3, 1).eval(), nn.BatchNorm2d(3).eval())
    with pytest.raises(ValueError, match="lazy and uninitialized"):
        fold_conv_bn(nn.Conv2d(2, 3, 1).eval(), nn.LazyBatchNorm2d().eval())
    assert foldable_pairs(nn.Sequential(nn.LazyConv2d(3, 1), nn.BatchNorm2d(3)).eval()) == []


# ---------------------------------------------------------------- whole models


def trained(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """Run a few training-mode batches so every BN has non-trivial running stats."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, *shape, generator=gen) * 2 + 0.5)
    return model.eval()


def cnn_with_unfoldable_bns(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d) -> nn.Sequential:
    return nn.Sequential(
        bn2d(3),  # first: nothing to fold into
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn2d(8),  # folded
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        bn2d(8),  # folded
        nn.ReLU(),
        bn2d(8),  # after an activation: not foldable
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        bn1d(10),  # folded
        nn.Tanh(),
        nn.Linear(10, 5),
    )


@pytest.mark.parametrize("bn_kind", ["torch", "bnbook"])
def test_fold_batch_norms_sequential(bn_kind):
    bns = (
        (nn.BatchNorm2d, nn.BatchNorm1d)
        if bn_kind == "torch"
        else (bnn.BatchNorm2d, bnn.BatchNorm1d)
    )
    model = trained(cnn_with_unfoldable_bns(*bns), (3, 8, 8))
    state = copy.deepcopy(model.state_dict())
    assert foldable_pairs(model) == [("1", "2"), ("4", "5"), ("10", "11")]
    folded = fold_batch_norms(model)
    names = [name for name, _ in folded.named_children()]
    assert names == ["0", "1", "3", "4", "6", "7", "8", "9", "10", "12", "13"]
    assert sum(is_batch_norm(m) for m in folded.modules()) == 2  # first and after-ReLU
    children = dict(folded.named_children())
    assert is_batch_norm(children["0"]) and is_batch_norm(children["7"])
    assert is_batch_norm(folded[5])  # integer indexing is positional
    assert foldable_pairs(folded) == []
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32)
    # the original is untouched, and still the unfolded model
    assert len(model) == 14 and not folded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_fold_batch_norms_float64_exact_to_1e12():
    model = trained(cnn_with_unfoldable_bns(), (3, 8, 8)).double()
    folded = fold_batch_norms(model)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64)
    assert all(p.dtype == torch.float64 for p in folded.parameters())


class Block(nn.Module):
    """A custom module: its children are folded only inside their Sequentials."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
        self.conv = nn.Conv1d(4, 4, 1)
        self.bn = nn.BatchNorm1d(4)  # called in forward after conv, but not in a Sequential
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv1d(4, 4, 1, bias=False), bn) for bn in (nn.BatchNorm1d(4),)]
        )

    def forward(self, x):
        return self.bn(self.conv(self.body(x))) + self.branches[0](x)


def test_fold_batch_norms_nested_modules():
    model = trained(nn.Sequential(Block(), nn.Sequential(Block(), nn.Flatten())), (4, 6))
    pairs = foldable_pairs(model)
    assert pairs == [
        ("0.body.0", "0.body.1"),
        ("0.branches.0.0", "0.branches.0.1"),
        ("1.0.body.0", "1.0.body.1"),
        ("1.0.branches.0.0", "1.0.branches.0.1"),
    ]
    folded = fold_batch_norms(model)
    assert isinstance(folded[0].bn, nn.BatchNorm1d)  # not in a Sequential: left alone
    assert list(dict(folded[0].body.named_children())) == ["0", "2"]
    assert folded[0].branches[0][0].bias is not None
    assert sum(is_batch_norm(m) for m in folded.modules()) == 2
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32)
    assert sum(is_batch_norm(m) for m in model.modules()) == 6


def test_fold_batch_norms_matches_torch_fx_fuse():
    with warnings.catch_warnings():  # the module imports torch.jit APIs it deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    model = trained(cnn_with_unfoldable_bns(), (3, 8, 8))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(fold_batch_norms(model)(x), fuse(model)(x), torch.float32)


def test_fold_batch_norms_skips_bn_without_running_stats():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    folded = fold_batch_norms(model)
    assert foldable_pairs(model) == [] and is_batch_norm(folded[1])


def test_fold_batch_norms_rejects_training_mode_and_non_modules():
    model = cnn_with_unfoldable_bns()
    with pytest.raises(ValueError, match="needs a model in eval mode.*call model.eval"):
        fold_batch_norms(model)
    model.eval()
    model[5].train()  # one stray module in training mode is enough
    with pytest.raises(ValueError, match=r"\['5'\] is training"):
        fold_batch_norms(model)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fold_batch_norms([nn.Conv2d(1, 1, 1)])


def test_parametrized_conv_is_folded_into_a_plain_conv():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
    bn = randomize_bn(nn.BatchNorm2d(3), torch.Generator().manual_seed(6))
    model = nn.Sequential(conv, bn).eval()
    folded = fold_batch_norms(model)
    assert type(folded[0]) is nn.Conv2d  # the weight-norm parametrization is baked in
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32)
