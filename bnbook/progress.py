"""Progress bars that people see and CI does not."""

from __future__ import annotations

import os

from tqdm.auto import tqdm

__all__ = ["progress", "quiet"]


def quiet() -> bool:
    """True when progress bars should stay silent: ``BNBOOK_QUIET=1`` or ``CI`` set."""
    flag = os.environ.get("BNBOOK_QUIET", "").strip().lower()
    if flag in {"1", "true", "yes"}:
        return True
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm`` that is disabled in CI and book builds (see :func:`quiet`)."""
    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
