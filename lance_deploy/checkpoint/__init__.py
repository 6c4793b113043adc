"""Checkpoint I/O for the Lance release layout.

Modules (import them directly; this package imports nothing so that
``import lance_deploy.checkpoint`` stays free of torch):

* ``safetensors_io`` - positioned-read safetensors reader (never maps a whole 28 GB file).
* ``safetensors_write`` - the streaming, atomic safetensors writer.
* ``layout``         - find the files of a download folder or a model folder (``discover``).
* ``names``          - the release key table, key classification, ``check_keys``.
* ``loader``         - stream tensors into a module built on the meta device (``load_into``,
  ``load_new``, ``load_layer``).
* ``inspect``        - header-only per-component parameter/byte counts.
* ``make`` (+ ``make_tokenizer``, ``make_vae``) - write random checkpoints in the release layout.
"""
