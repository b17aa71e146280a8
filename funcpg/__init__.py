"""funcpg: policy-gradient reference implementations in PyTorch, one self-contained file per algorithm.

The algorithm scripts (reinforce.py, ...) never import this package; it only carries the version.
"""

__version__ = "0.1.0"
