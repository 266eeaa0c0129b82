"""bnbook: the tested code behind the executable book on batch normalization.

Modules, one concern each:

- :mod:`bnbook.functional` - NumPy reference maths (batch norm and its gradients).
- :mod:`bnbook.nn` - torch modules written from scratch (``BatchNorm1d/2d/3d``).
"""

__version__ = "0.1.0"
