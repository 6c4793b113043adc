"""The on-disk contracts we write and read back (as gguf-py is to llama.cpp).

- ``manifest``        the quantized artifact's ``manifest.json``: every tensor's format, shape,
                      shard, offsets and sha256, every copied file's hash.
- ``reader``          checksum-verified reads of packed tensors and copied files.
- ``writer``          the streaming, resumable writer (``.partial`` folder sealed by rename).
- ``load``            an artifact's tensors into the release modules (QLinear for packed weights).
- ``graph_manifest``  an export folder's ``manifest.json`` (ONNX graphs, profiles, engines).

Import the submodule you need; this package imports nothing.
"""
