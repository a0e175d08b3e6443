"""Make bitsandbytes see a CPU with AVX512-BF16, whatever this one is, and `kernels` not installed.

bitsandbytes asks the CPU at import (`bitsandbytes.functional.has_avx512bf16`, called by its CPU
backend) and, where AVX512-BF16 is there, logs that the optional `kernels` package for its 4-bit CPU
kernel is missing. A test puts this folder first on a child process's PYTHONPATH so that what it sees
is the same on every CPU.
"""

import importlib.machinery
import sys

sys.modules["kernels"] = None  # importing it fails, as where it is not installed


class AVX512BF16Finder:
    """Loads `bitsandbytes.functional` as usual, then makes its CPU check say yes."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_with_avx512bf16(module):
            exec_module(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_with_avx512bf16
        return spec


sys.meta_path.insert(0, AVX512BF16Finder())
