"""Synchronized batch norm on several local processes: a demo and the check behind the tests.

Run ``python -m bnbook.distributed_demo`` (add ``--json`` for machine-readable
output): two processes on 127.0.0.1 each hold part of one batch and normalize
it twice, with plain per-worker batch norm and with
:class:`bnbook.distributed.SyncBatchNorm`; both are compared with one batch
norm over the whole batch in a single process.

:func:`compare_worker` and :func:`reference` run the same training steps
distributed and in one process; ``tests/test_distributed.py`` checks that
they agree.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bnbook.distributed import SyncBatchNorm, launch

__all__ = ["global_batches", "compare_worker", "reference", "demo_worker", "run_demo", "main"]


def global_batches(sizes, tail=(), channels=3, steps=1, seed=0, dtype=torch.float64):
    """The batches every process agrees on: ``steps`` inputs ``(sum(sizes), channels, *tail)``.

    Drawn from a seeded generator with channel means ``0, 1, 2, ...`` and
    growing spreads, plus upstream gradients of the same shape, so that every
    process builds the same global data and takes its own slice.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(sum(sizes))
    shape = (n, channels, *tail)
    view = (1, channels) + (1,) * len(tail)
    means = torch.arange(channels, dtype=dtype).reshape(view)
    spreads = (1.0 + torch.arange(channels, dtype=dtype)).reshape(view)
    xs = [torch.randn(shape, generator=g, dtype=dtype) * spreads + means for _ in range(steps)]
    dys = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]
    return xs, dys


def _rank_slice(sizes, rank):
    start = int(sum(sizes[:rank]))
    return slice(start, start + int(sizes[rank]))


def _run_steps(bn, xs, dys, where):
    for x, dy in zip(xs, dys, strict=True):
        x = x[where].clone().requires_grad_()
        y = bn(x)
        y.backward(dy[where])
    out = {"y": y.detach(), "dx": x.grad}
    if bn.affine:
        out["dweight"], out["dbias"] = bn.weight.grad, bn.bias.grad
    if bn.track_running_stats:
        out["running_mean"], out["running_var"] = bn.running_mean, bn.running_var
        out["num_batches_tracked"] = bn.num_batches_tracked
    return out


def _dtype(case) -> torch.dtype:
    return getattr(torch, case.get("dtype", "float64"))


def _bn_kwargs(affine, momentum, track):
    return {"affine": affine, "momentum": momentum, "track_running_stats": track}


def compare_worker(rank, world_size, cases):
    """On one process: run each case with :class:`SyncBatchNorm` on this rank's slice.

    ``cases`` is a list of dicts with keys ``sizes`` (local batch size per rank),
    ``tail`` (spatial shape), ``channels``, ``steps``, ``affine``, ``momentum``,
    ``track`` and optionally ``dtype`` (a torch dtype name, default
    ``"float64"``). Returns one dict of final output, input gradient, parameter
    gradients (accumulated over the steps) and running statistics per case.
    """
    results = []
    for case in cases:
        dtype = _dtype(case)
        xs, dys = global_batches(
            case["sizes"], case["tail"], case["channels"], case["steps"], dtype=dtype
        )
        bn = SyncBatchNorm(
            case["channels"], **_bn_kwargs(case["affine"], case["momentum"], case["track"])
        ).to(dtype)
        if case["affine"]:  # non-trivial parameters, the same on every rank
            with torch.no_grad():
                bn.weight.copy_(torch.linspace(0.5, 2.0, case["channels"]))
                bn.bias.copy_(torch.linspace(-1.0, 1.0, case["channels"]))
        results.append(_run_steps(bn, xs, dys, _rank_slice(case["sizes"], rank)))
    return results


def reference(case):
    """The steps of :func:`compare_worker`, with torch's own batch norm on the whole batch."""
    dtype = _dtype(case)
    xs, dys = global_batches(
        case["sizes"], case["tail"], case["channels"], case["steps"], dtype=dtype
    )
    cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}.get(
        len(case["tail"]), torch.nn.BatchNorm3d
    )
    bn = cls(case["channels"], **_bn_kwargs(case["affine"], case["momentum"], case["track"]))
    bn = bn.to(dtype)
    if case["affine"]:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, case["channels"]))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, case["channels"]))
    return _run_steps(bn, xs, dys, slice(None))


def demo_worker(rank, world_size, sizes):
    """Per-worker statistics versus synchronized ones, on this rank's slice of one batch."""
    xs, _ = global_batches(sizes, tail=(4, 4), channels=3, seed=1)
    local = xs[0][_rank_slice(sizes, rank)]
    plain = torch.nn.functional.batch_norm(local, None, None, training=True)
    sync = SyncBatchNorm(3, affine=False).double()
    y = sync(local)
    return {
        "local_mean": local.mean(dim=(0, 2, 3)),
        "local_var": local.var(dim=(0, 2, 3), unbiased=False),
        "y_plain": plain,
        "y_sync": y.detach(),
        "running_mean": sync.running_mean,
        "running_var": sync.running_var,
    }


def run_demo(sizes=(3, 5), timeout=120.0):
    """Launch :func:`demo_worker` on ``len(sizes)`` processes; summarize against one big batch.

    Returns a dict of plain Python numbers and lists: the batch sizes, each
    worker's channel means, the global ones, and the largest deviation of the
    per-worker and of the synchronized outputs from one batch norm over the
    whole batch.
    """
    sizes = [int(s) for s in sizes]
    outs = launch(demo_worker, len(sizes), args=(sizes,), timeout=timeout)
    xs, _ = global_batches(sizes, tail=(4, 4), channels=3, seed=1)
    full = torch.nn.functional.batch_norm(xs[0], None, None, training=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.nn.functional.batch_norm(xs[0], rm, rv, training=True)
    y_plain = torch.cat([torch.from_numpy(o["y_plain"]) for o in outs])
    y_sync = torch.cat([torch.from_numpy(o["y_sync"]) for o in outs])
    return {
        "sizes": sizes,
        "worker_means": [o["local_mean"].tolist() for o in outs],
        "global_mean": xs[0].mean(dim=(0, 2, 3)).tolist(),
        "max_dev_plain": float((y_plain - full).abs().max()),
        "max_dev_sync": float((y_sync - full).abs().max()),
        "max_dev_running_var": float(
            max(abs(torch.from_numpy(o["running_var"]) - rv).max() for o in outs)
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5], help="local batch sizes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    summary = run_demo(args.sizes, args.timeout)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{len(summary['sizes'])} processes on 127.0.0.1, local batch sizes {summary['sizes']}")
    for rank, means in enumerate(summary["worker_means"]):
        print(f"  rank {rank}: channel means " + ", ".join(f"{m:+.3f}" for m in means))
    print("  whole batch: channel means " + ", ".join(f"{m:+.3f}" for m in summary["global_mean"]))
    print(f"max |y - y_full|, per-worker BN:   {summary['max_dev_plain']:.3g}")
    print(f"max |y - y_full|, SyncBatchNorm:   {summary['max_dev_sync']:.3g}")
    print(f"max |running_var - full|, synced: {summary['max_dev_running_var']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
