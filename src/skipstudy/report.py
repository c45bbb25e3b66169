"""``python -m skipstudy.report RUN_OR_SWEEP_DIR... [--out DIR]``: comparison report from logs.

A thin entry point; the work is in :mod:`skipstudy.analysis.report`.
"""

import sys

from skipstudy.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
