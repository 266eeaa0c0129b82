"""Torch modules written from scratch, compatible with their ``torch.nn`` namesakes."""

from bnbook.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
