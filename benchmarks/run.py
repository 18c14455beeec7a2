"""Run the benchmark harness from a checkout, on the checkout's code: ``python benchmarks/run.py --help``.

The harness lives in the package (`gradkit.bench`, also ``gradkit bench`` once
installed); this folder keeps the figures of its long runs, in RESULTS.md.
"""

import sys
from pathlib import Path

# The checkout's src/ first, so that the numbers are those of the code next to this file
# (its workers inherit the same gradkit), whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradkit.bench.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
