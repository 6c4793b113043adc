"""lance-deploy: quantization and edge deployment for ByteDance Lance.

Importing the package stays lean: no torch, no CUDA initialisation.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting turn every small op into a scheduler quantum on a busy
# machine (measured in docs/benchmarks.md, "Calibration time"). Set before torch loads; the user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
