"""ONNX export, onnxruntime verification and TensorRT engine builds of Lance's graphs.

Parts: ``gen-layer`` and ``und-layer`` (one MoT decoder layer per graph, per layer index),
``vit`` (one temporal slice of a static patch grid), ``vae-decoder`` / ``vae-encoder``
(fixed-size spatial tiles with the causal frame caches as explicit inputs and outputs).
An export folder holds ``manifest.json`` (see ``manifest.py``), ``graphs/`` and, once built on
a GPU, ``engines/<gpu>/``.

Importing this package is cheap: onnx, onnxruntime and tensorrt are imported inside the
functions that need them, each failing with an install hint when absent.
"""
