"""Eval-mode inference with batch norm unfolded, folded by bnbook, and fused by torch.

The model is a small CNN: three blocks conv3x3 -> BatchNorm2d -> ReLU with
channels 3 -> 32 -> 64 -> 64, on a batch of 64 images of 32x32. Variants:

- ``unfolded``: the model as trained, batch norm using its running statistics;
- ``bnbook fold``: :func:`bnbook.fold.fold_batch_norms`;
- ``torch fuse_conv_bn_eval``: torch.nn.utils.fusion.fuse_conv_bn_eval applied
  to each conv/BN pair, rebuilt as a Sequential (the same structure as bnbook's);
- ``torch.fx fuse``: torch.fx.experimental.optimization.fuse, a traced GraphModule.

All run under ``torch.inference_mode()``, interleaved in one process (see
:mod:`bnbook.benchmarking`). The output error of each variant is measured
against a float64 copy of the unfolded model.

Run ``python benchmarks/fold_inference.py [--repeats N] [--threads T]``; the
notebook of chapter 5 imports :func:`run` with small repeat counts.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bnbook.benchmarking import interleaved_timings, paired_ratio, paired_ratios, timing_table
from bnbook.fold import fold_batch_norms

CHANNELS = (3, 32, 64, 64)
BATCH, SIZE = 64, 32


def build_cnn(seed: int = 0, channels=CHANNELS) -> nn.Sequential:
    """The benchmark CNN in eval mode, with non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        bn = nn.BatchNorm2d(c_out)
        with torch.no_grad():  # as after training: statistics and affine far from (0, 1)
            bn.running_mean.copy_(torch.randn(c_out, generator=gen))
            bn.running_var.copy_(torch.rand(c_out, generator=gen) * 2 + 0.1)
            bn.weight.copy_(1 + 0.3 * torch.randn(c_out, generator=gen))
            bn.bias.copy_(0.3 * torch.randn(c_out, generator=gen))
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def torch_fused_per_pair(model: nn.Sequential) -> nn.Sequential:
    """Apply torch's fuse_conv_bn_eval to every conv -> BN pair of a flat Sequential."""
    out: list[nn.Module] = []
    mods = list(model)
    i = 0
    while i < len(mods):
        if (
            isinstance(mods[i], nn.Conv2d)
            and i + 1 < len(mods)
            and isinstance(mods[i + 1], nn.BatchNorm2d)
        ):
            out.append(fuse_conv_bn_eval(mods[i], mods[i + 1]))
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return nn.Sequential(*out).eval()


def torch_fx_fused(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # the module imports torch.jit APIs it deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse
    return fuse(model)


def run(
    repeats: int = 30, number: int = 3, threads: int | None = None, seed: int = 0, warmup: int = 2
) -> dict:
    """Time the four variants interleaved; return timings, ratios, errors and a table.

    Returns
    -------
    dict with keys
        ``timings`` (name -> seconds per forward, per repetition), ``errors``
        (name -> max abs output difference from the float64 model),
        ``speedup`` (name -> paired ratio unfolded / variant),
        ``bnbook_vs_torch`` (paired ratio torch fuse_conv_bn_eval / bnbook fold:
        >= 1 means bnbook's folded model is at least as fast), ``bnbook_vs_torch_iqr``
        (quartiles of that ratio over repetitions: its noise), ``table`` (Markdown),
        ``threads`` (the torch thread count used; the caller's is restored).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(repeats, number, seed, warmup)
    finally:
        torch.set_num_threads(previous)


def _measure(repeats: int, number: int, seed: int, warmup: int) -> dict:
    model = build_cnn(seed)
    variants = {
        "unfolded": model,
        "bnbook fold": fold_batch_norms(model),
        "torch fuse_conv_bn_eval": torch_fused_per_pair(model),
        "torch.fx fuse": torch_fx_fused(model),
    }
    x = torch.randn(
        BATCH, CHANNELS[0], SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1)
    )
    reference = build_cnn(seed).double()
    with torch.inference_mode():
        exact = reference(x.double())
        errors = {name: (m(x).double() - exact).abs().max().item() for name, m in variants.items()}
        fns = {name: (lambda m=m: m(x)) for name, m in variants.items()}
        timings = interleaved_timings(fns, repeats, number=number, warmup=warmup, seed=seed)
    speedup = {name: paired_ratio(timings, "unfolded", name) for name in variants}
    table = timing_table(
        timings,
        "unfolded",
        extra={"max abs error vs float64": {k: f"{v:.1e}" for k, v in errors.items()}},
    )
    return {
        "timings": timings,
        "errors": errors,
        "speedup": speedup,
        "bnbook_vs_torch": paired_ratio(timings, "torch fuse_conv_bn_eval", "bnbook fold"),
        "bnbook_vs_torch_iqr": tuple(
            float(q)
            for q in np.percentile(
                paired_ratios(timings, "torch fuse_conv_bn_eval", "bnbook fold"), [25, 75]
            )
        ),
        "bnbook_vs_fx": paired_ratio(timings, "torch.fx fuse", "bnbook fold"),
        "table": table,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--number", type=int, default=3, help="forward passes per timing")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    result = run(args.repeats, args.number, args.threads)
    print(
        f"CNN {'->'.join(map(str, CHANNELS))}, batch {BATCH}, {SIZE}x{SIZE}, "
        f"{result['threads']} threads, {args.repeats} interleaved repeats x {args.number} passes\n"
    )
    print(result["table"])
    ratio = result["bnbook_vs_torch"]
    verdict = "meets" if ratio >= 0.95 else "misses"
    lo, hi = result["bnbook_vs_torch_iqr"]
    print(
        f"\nbnbook fold vs torch fuse_conv_bn_eval: {ratio:.3f}x ({verdict} the goal >= 0.95; "
        f"quartiles over repetitions {lo:.3f}-{hi:.3f}); "
        f"vs torch.fx fuse: {result['bnbook_vs_fx']:.3f}x"
    )


if __name__ == "__main__":
    main()
