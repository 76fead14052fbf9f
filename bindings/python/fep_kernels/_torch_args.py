"""The earlier import path of ``fep_kernels.torch._args``, kept working: importing it makes
``fep_kernels._torch_args`` the same module object."""

import sys

from .torch import _args as _module

sys.modules[__name__] = _module
