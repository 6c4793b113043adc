"""Quantization: recipes, per-tensor plans, algorithms and the streaming, resumable quantizer.

- ``recipe`` / ``rule``  typed recipes (YAML) and their ordered rules.
- ``plan``               resolved per-tensor formats and bytes (``lance-deploy plan``).
- ``algorithms``         RTN, AWQ, GPTQ, SmoothQuant: pure functions returning ``PackedTensor``s.
- ``apply`` / ``layerwise``  one decoder layer quantized from replayed calibration inputs.
- ``budget`` / ``sensitivity``  the per-group knapsack of ``--budget``.
- ``quantize`` / ``jobs``  the streaming quantizer and its resumable job folder.
- ``evaluate`` / ``report`` / ``metrics``  ``lance-deploy eval``.

Packed formats and ``QLinear`` live in ``lance_deploy.formats``; the artifact format in
``lance_deploy.artifact``. Nothing on the runtime side imports this package.
"""
