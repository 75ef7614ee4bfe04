"""`python -m benchmarks ...`: the harness of benchmarks/bench.py.

Like every entry point, it restarts itself once with glibc's huge-page setting
(igpt/runtime.py), which both frameworks need: otherwise glibc hands out the multi-GB buffers
of every S-size train step as fresh 4 KiB-page mappings, about 1.4 million page faults (2-3 s
of system time) per step.
"""

import sys

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

from benchmarks.bench import main

sys.exit(main())
