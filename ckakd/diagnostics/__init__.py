"""Diagnostics for knowledge distillation (Guo et al., "Why does Knowledge Distillation Work? Rethink its
Attention and Fidelity Mechanism"); the implementation is being split into one module per kind of measure."""

from ckakd.diagnostics.attention import *  # noqa: F403
from ckakd.diagnostics.attention import LayerArg, ModelsArg, __all__  # noqa: F401
