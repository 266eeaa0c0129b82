"""``BatchNorm1d/2d/3d`` written from scratch, drop-in compatible with ``torch.nn``.

Same constructor arguments, same buffers and parameters, the same
``state_dict`` keys (a torch state_dict loads into these modules and back),
the same accepted input ranks. The arithmetic is :func:`bnbook.nn.functional.batch_norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from bnbook.nn import functional as bnf

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(nn.Module):
    """Shared logic; subclasses only say which input ranks they accept."""

    _version = 2  # as torch: version 2 added num_batches_tracked
    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:  # torch >= 2.6: a scale without a shift
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    # The arithmetic; SyncBatchNorm swaps in the hand-written autograd Function.
    _functional = staticmethod(bnf.batch_norm)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Raise ``ValueError`` unless the input rank is one this class accepts."""
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    def _check_input(self, input: torch.Tensor) -> None:
        bnf.check_float_tensor(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with "
                f"{input.shape[1]} channels (dim 1) and shape {tuple(input.shape)}"
            )

    def _average_factor(self) -> float:
        """Weight of this batch in the running statistics (as torch computes it)."""
        if self.momentum is not None:
            return self.momentum
        if self.training and self.track_running_stats:  # cumulative moving average
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return 0.0

    def _normalize(self, input: torch.Tensor, factor: float) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return self._functional(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        y = self._normalize(input, self._average_factor())
        if self.training and self.track_running_stats:
            # only after a successful update: a rejected batch leaves no trace
            self.num_batches_tracked.add_(1)
        return y

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # state_dicts saved before num_batches_tracked existed load as torch's do:
        # the module keeps its own count (0 for a fresh module).
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked is not None
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over a ``(N, C)`` or ``(N, C, L)`` input; see ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over a ``(N, C, H, W)`` input, one mean and variance per channel."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over a ``(N, C, D, H, W)`` input; see ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)
