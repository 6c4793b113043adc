"""lance-deploy: quantization and edge deployment for ByteDance Lance.

Importing the package stays lean: no torch, no CUDA initialisation.
"""

__version__ = "0.1.0"
