"""Static checks of the book's front and back matter (no build, no browser).

The API reference lists the ``bnbook`` modules by hand (with a heading and a
sentence each), so a new module must be added there; this test says which.
The offline cross-reference helper in ``book/_ext`` is tested on the names the
docstrings use.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import bnbook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import bnbook_site  # noqa: E402


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(bnbook.__path__, prefix="bnbook."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _reexported_by_parent(name: str) -> bool:
    """True if the module's public names are all in its parent package's ``__all__``."""
    module = importlib.import_module(name)
    parent = importlib.import_module(name.rpartition(".")[0])
    exported = set(getattr(module, "__all__", ()))
    return bool(exported) and exported <= set(getattr(parent, "__all__", ()))


def test_every_bnbook_module_is_in_the_api_reference():
    documented = set(re.findall(r"automodule::\s+(\S+)", (ROOT / "book/api.md").read_text()))
    missing = [
        name
        for name in _public_modules()
        if name not in documented and not _reexported_by_parent(name)
    ]
    assert not missing, f"add these modules to book/api.md: {missing}"


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("ndarray", "https://numpy.org/doc/stable/reference/generated/numpy.ndarray.html"),
        ("np.mean", "https://numpy.org/doc/stable/reference/generated/numpy.mean.html"),
        (
            "numpy.random._generator.Generator",
            "https://numpy.org/doc/stable/reference/random/generator.html#numpy.random.Generator",
        ),
        ("Tensor", "https://pytorch.org/docs/stable/tensors.html#torch.Tensor"),
        ("torch.dtype", "https://pytorch.org/docs/stable/tensor_attributes.html#torch.dtype"),
        ("nn.Module", "https://pytorch.org/docs/stable/generated/torch.nn.Module.html"),
        (
            "torch.nn.modules.batchnorm.BatchNorm2d",
            "https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html",
        ),
        (
            "torch.nn.Module.eval",
            "https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval",
        ),
        (
            "F.batch_norm",
            "https://pytorch.org/docs/stable/generated/torch.nn.functional.batch_norm.html",
        ),
        ("torch.Tensor.mean", "https://pytorch.org/docs/stable/generated/torch.Tensor.mean.html"),
        (
            "torch.optim.Optimizer",
            "https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.html",
        ),
        ("bnbook.nn.BatchNorm2d", None),
        ("shape", None),
    ],
)
def test_numpy_and_torch_names_link_to_their_docs(target, url):
    assert bnbook_site.external_url(target) == url


@pytest.mark.parametrize(
    ("line", "escaped"),
    [
        ("x : ndarray, shape (N, C) or (N, C, *)", r"x : ndarray, shape (N, C) or (N, C, \*)"),
        ("shape ``(N, C, *)`` stays literal", "shape ``(N, C, *)`` stays literal"),
        (r":math:`\prod *` stays maths", r":math:`\prod *` stays maths"),
        ("*emphasis* and **strong** stay", "*emphasis* and **strong** stay"),
        ("where * is any", r"where \* is any"),
        (
            "x : ndarray, shape (*, *normalized_shape)",
            r"x : ndarray, shape (\*, \*normalized_shape)",
        ),
        ("*two words* stay emphasis", "*two words* stay emphasis"),
    ],
)
def test_shape_wildcards_are_escaped_outside_literals(line, escaped):
    assert bnbook_site.escape_lone_stars(line) == escaped
