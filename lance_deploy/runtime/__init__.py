"""Execution mechanisms below the pipeline: how weights move and where graphs run.

- ``pager``      byte ledger, pinned host copies, two device slots per expert, side-stream prefetch.
- ``residency``  per-phase spans: what each phase places, streams or parks.
- ``markers``    the compact und copy that serves the two denoising marker rows.
- ``graphs``     onnxruntime / TensorRT graphs as drop-ins for the denoising query and VAE decode.
- ``tensorrt``   loading engines on the GPU they were built for.

Planning (how much fits) is `lance_deploy.planning`, one floor up.
"""
