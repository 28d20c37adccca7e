"""Benchmarks for ghostfunc: run them as modules from the repository root, e.g. ``python -m benchmarks.headline``.

- :mod:`benchmarks.headline`: every contender on the issue's GPT-2-like shape (time, peak memory, goals);
- :mod:`benchmarks.sweep`: one size varied (``T``, ``n``, width) for GPT-2- or Llama-shaped models;
- :mod:`benchmarks.mlp2d`: a token-wise MLP over a grid of ``T`` x width, where the 2T² rule flips;
- :mod:`benchmarks.longseq`: peak memory at long sequences (``T = 4096``).

Shared machinery (models, contenders, timing, memory, output) is in :mod:`benchmarks._common`.
"""
