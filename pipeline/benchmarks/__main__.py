"""``python -m pipeline.benchmarks <mode> ...``: one measured child process of bench_features."""

import sys

from pipeline.benchmarks.stage_one import _child_main

_child_main(sys.argv[1:])
