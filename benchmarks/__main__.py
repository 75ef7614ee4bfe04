"""`python -m benchmarks ...`: the harness of benchmarks/bench.py.

Like every entry point, it restarts itself once with glibc's malloc tunables
(igpt/runtime.py), which both frameworks need: otherwise glibc hands out the multi-GB buffers
of every S-size train step as fresh mappings, faulted in again on every step.
"""

import sys

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from benchmarks.bench import main

sys.exit(main())
