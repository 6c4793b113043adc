"""Calibration: record what the backbone computes on calibration tasks, then replay it layer by layer.

The runtime never imports this package.
"""
