"""The earlier import path of ``fep_kernels.torch.settle``, kept working: importing it makes
``fep_kernels.torch_settle`` the same module object."""

import sys

from .torch import settle as _module

sys.modules[__name__] = _module
