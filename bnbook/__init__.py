"""bnbook: the tested code behind the executable book on batch normalization.

One concern per module:

The maths
    :mod:`bnbook.functional` (NumPy reference: batch norm, its backward, layer/
    group/instance/RMS norm), :mod:`bnbook.numerics` (accurate means and
    variances).
Torch layers
    :mod:`bnbook.nn` (``BatchNorm1d/2d/3d`` from scratch; ``bnbook.nn.functional``,
    ``bnbook.nn.fast``), :mod:`bnbook.norms` (Batch Renorm, Weight
    Standardization, SkipInit), :mod:`bnbook.distributed` (``SyncBatchNorm`` on
    CPU), :mod:`bnbook.fold` (folding BN for inference),
    :mod:`bnbook.running_stats` (momentum conventions, re-estimation).
Experiments
    :mod:`bnbook.data`, :mod:`bnbook.models`, :mod:`bnbook.train`,
    :mod:`bnbook.experiments`, :mod:`bnbook.replicas`, :mod:`bnbook.rnn`,
    :mod:`bnbook.ics`, :mod:`bnbook.diagnostics`.
Presentation and measurement
    :mod:`bnbook.plots`, :mod:`bnbook.progress`, :mod:`bnbook.benchmarking`,
    :mod:`bnbook.speed`, :mod:`bnbook.distributed_demo`.
"""

__version__ = "0.1.0"
