"""The earlier import path of ``fep_kernels.torch.lca``, kept working: importing it makes
``fep_kernels.torch_lca`` the same module object."""

import sys

from .torch import lca as _module

sys.modules[__name__] = _module
