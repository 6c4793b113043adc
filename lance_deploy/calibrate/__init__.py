"""Calibration: prompt sets, its config, recordings of real runs and their layer-by-layer replay.

The runtime never imports this package.
"""
