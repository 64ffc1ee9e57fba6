"""adaln.bench: measurements reachable from the installed package.

``gpu_report`` checks and times every fused kernel, module, model and the real job on one CUDA device
within a budget it enforces itself (``adaln bench gpu``, ``benchmarks/gpu_report.py``); ``--smoke`` runs
the same code on CPU at tiny shapes. ``cases`` holds the op configurations and comparisons, ``timing``
the timers, ``report`` the records and report.md.
"""
