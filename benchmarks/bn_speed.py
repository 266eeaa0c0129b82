"""How fast is each batch-norm implementation? Forward + backward, interleaved in one run.

    .venv/bin/python benchmarks/bn_speed.py [--repeats 30] [--threads 1 2]

Torch, on a (128, 64, 16, 16) float32 tensor on CPU: torch's native
``F.batch_norm``, bnbook's composed tensor ops differentiated by autograd
(``bnbook.nn.functional.batch_norm``) and bnbook's hand-written
``autograd.Function`` (``bnbook.nn.functional.batch_norm_fast``). Goal: the
Function within 2x of native.

NumPy, same shape: the backward pass node by node (staged) versus the closed
form (compact). Goal: compact at least 2x faster.

Every repetition runs each variant once in a shuffled order
(:func:`bnbook.benchmarking.interleaved_timings`); ratios are medians of
per-repetition ratios, so load changes on a shared machine cancel out.
"""

from __future__ import annotations

import argparse
import math

import torch

from bnbook.benchmarking import interleaved_timings, paired_ratio, timing_table
from bnbook.speed import SHAPE, count_traffic, numpy_backward_variants, torch_variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
        help="torch intra-op thread counts to run with",
    )  # fmt: skip
    args = parser.parse_args(argv)

    variants = torch_variants(SHAPE)
    numel = math.prod(SHAPE)
    traffic = {name: count_traffic(fn, numel) for name, fn in variants.items()}
    print(f"torch, forward + backward, input {SHAPE} float32, {args.repeats} repeats")
    default_threads = torch.get_num_threads()
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        t = interleaved_timings(variants, repeats=args.repeats, warmup=2)
        slowdown = {n: f"{paired_ratio(t, n, 'native F.batch_norm'):.2f}x" for n in t}
        extra = {
            "time / native": slowdown,
            "kernels": {n: str(c["kernels"]) for n, c in traffic.items()},
            "tensor passes": {n: str(c["passes"]) for n, c in traffic.items()},
        }
        print(f"\n{threads} thread(s)")
        print(timing_table(t, baseline="native F.batch_norm", extra=extra))
    torch.set_num_threads(default_threads)

    t = interleaved_timings(numpy_backward_variants(SHAPE), repeats=args.repeats, warmup=1)
    print(f"\nNumPy backward, input {SHAPE} float32")
    print(timing_table(t, baseline="staged"))
    print(f"compact is {paired_ratio(t, 'staged', 'compact'):.2f}x faster than staged (goal >= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
