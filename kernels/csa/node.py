"""The eager CSA op's autograd node in C++ (`csrc/csa/csa_node.cpp`), built on first use.

At small batches the eager op is host-bound, and most of that host time is Python: the autograd.Function's
entry, and its backward, which runs on autograd's device thread and takes the GIL there (profiles/csa.md).
The node launches the same compiled Triton kernels with the same arguments and allocations, so its results
are bitwise those of the Python path, without Python on either side.

`triton_csa.csa_attention_triton` uses it for eager calls that need gradients once a set of shapes has a
plan: the first call of a set goes through the Python path, which compiles and binds the three kernels
(`kernels.common.launch_keyed`); the next one reads them back (`kernels.common.bound_kernel`) into a plan.
The extension is built by torch.utils.cpp_extension (a C++ compiler and ninja; tens of seconds once, then
cached in TORCH_EXTENSIONS_DIR). If it does not build, a warning, and the Python path stays. HYLA_CSA_NODE=0
(or `ENABLED = False`) keeps the Python path.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "csa" / "csa_node.cpp"
ENABLED = os.environ.get("HYLA_CSA_NODE", "1") != "0"


@functools.cache
def extension():
    """The compiled module (`make_plan`, `apply`), or None if it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load

        print("hyla: loading the CSA autograd node (built once, then cached)", file=sys.stderr)
        return load(name="hyla_csa_node", sources=[str(SOURCE)], extra_cflags=["-O2"], extra_ldflags=["-ldl"])
    except Exception as e:  # no compiler, no ninja, no source: the Python autograd.Function serves
        warnings.warn(f"hyla: the CSA autograd node did not build, eager CSA keeps its Python path ({e})", stacklevel=2)
        return None
