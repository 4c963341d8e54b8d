#!/usr/bin/env python
"""megalong's GPU acceptance script: one command, every GPU path checked against a reference.

    python tools/gpu_check.py --out gpu-check-results --require te,flash-attn,fp8
    python tools/gpu_check.py --out DIR --quick                  # the short variant
    python tools/gpu_check.py --out DIR --only fp8,eval          # some checks
    python tools/gpu_check.py --out DIR --allow-no-gpu           # the CPU-runnable parts
    python tools/gpu_check.py --list

Writes DIR/gpu_check.json (every figure, every verdict), prints a verdict per check, and
exits 1 when a check fails or a required feature is missing, 2 when nothing could be
checked (no GPU without --allow-no-gpu). What each check proves: docs/gpu.md. The checks
live in megalong/gpucheck/.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megalong.gpucheck.runner import main

    sys.exit(main())
