"""Optional dependencies: import on first use, or fail with a one-line install hint.

The extras of `pyproject.toml` are the one place that says what installs each package.
"""

from __future__ import annotations

import importlib

from lance_deploy.core.errors import LanceError

# module -> (extra, what it is for)
EXTRAS = {
    "onnx": ("onnx", "ONNX export"),
    "onnxscript": ("onnx", "ONNX export"),
    "onnxruntime": ("onnx", "onnxruntime verification and --backend onnxruntime"),
    "bitsandbytes": ("bnb", "the bitsandbytes nf4 kernels"),
    "tensorrt": ("trt", "TensorRT engines"),
    "fastapi": ("serve", "lance-deploy serve"),
    "uvicorn": ("serve", "lance-deploy serve"),
    "sse_starlette": ("serve", "lance-deploy serve"),
    "python_multipart": ("serve", "lance-deploy serve (multipart uploads)"),
    "gradio": ("serve", "the web UI"),
    "ray": ("ray", "lance-deploy serve --ray"),
}
TRT_HINT = ("TensorRT is not installed: pip install tensorrt --extra-index-url https://pypi.nvidia.com "
            "(needs an NVIDIA GPU)")


def install_hint(module: str) -> str:
    if module == "tensorrt":
        return TRT_HINT
    extra, purpose = EXTRAS[module]
    return f"{purpose} needs {module}, which is not installed: pip install 'lance-deploy[{extra}]'"


def require(module: str):
    """`import module`, or a LanceError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LanceError(install_hint(module)) from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
