"""lance-deploy: quantization and edge deployment for ByteDance Lance.

Importing the package stays lean: no torch, no CUDA initialisation.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting turn every small op into a scheduler quantum on a busy
# machine: a tiny-model calibration run took 197 s at 2 threads, 16 s at 1 and 13 s with passive
# waiting, on 2 shared cores (docs/benchmarks.md). Set before torch loads; the user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
