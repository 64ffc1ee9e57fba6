"""The GPU report: every fused kernel, module, model and the real job checked and timed on one CUDA device.

    python benchmarks/gpu_report.py --out DIR [--smoke] [--budget SECONDS] [--sections a,b]

The same as ``adaln bench gpu``; see ``adaln.bench.gpu_report`` and docs/gpu_report.md.
"""

import sys

from adaln.bench.gpu_report import main

if __name__ == "__main__":
    sys.exit(main())
