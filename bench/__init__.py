"""Benchmarks against cuDNN through PyTorch (PyTorch is a bench-only dependency).

``python -m bench.kernels``: every op family on the real layer shapes of
attention56 and attention92, ours against PyTorch's cuDNN/ATen composition.
``python -m bench.step``: images/s of a whole training step, ours against the
same network written in PyTorch (``bench.torch_model``), eager and compiled.
Both take ``--dry-run``: the whole harness on the CPU with the interpret backend
and tiny shapes, agreement checks included, and no timing claim. See
bench/README.md.
"""
