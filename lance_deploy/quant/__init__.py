"""Quantization building blocks: packed formats, the runtime Linear, and algorithms.

Layering (one-way; the runtime loads artifacts without importing calibration code):

- ``quant.formats``     bits and bytes only: ``FormatSpec``, ``PackedTensor`` and, per format,
                        round-to-nearest packing plus a slow pure-torch reference dequantizer.
- ``quant.qlinear``     ``QLinear``: a Linear that holds a ``PackedTensor`` as plain buffers and
                        dispatches to the best kernel the device has; imports ``formats`` only.
- ``quant.algorithms``  how weights and scales are chosen (RTN, AWQ, GPTQ, SmoothQuant) from
                        ``LayerStats``; pure functions returning ``PackedTensor``s.
- ``quant.metrics``     SQNR, cosine similarity, PSNR.

Importing this package imports nothing; import the submodule you need.
"""
