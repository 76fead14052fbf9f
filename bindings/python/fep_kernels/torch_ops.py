"""The earlier import path of ``fep_kernels.torch.ops``, kept working: importing it makes
``fep_kernels.torch_ops`` the same module object."""

import sys

from .torch import ops as _module

sys.modules[__name__] = _module
