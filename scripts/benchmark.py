"""Benchmark igpt (forward, train step, sampling, tokenizer), optionally against transformers.

python scripts/benchmark.py --preset tiny --mode sample,train --vs-hf
python scripts/benchmark.py --preset s --batch 2 --mode train --vs-hf --repeats 2
python scripts/benchmark.py --d 128 --layers 4 --heads 4 --side 16 --mode sample --vs-hf

Prints one JSON line per measurement, then a table; see igpt/benchmark.py for the FLOP count.

Like every entry point, it restarts itself once with glibc's huge-page setting
(igpt/runtime.py), which both frameworks need: otherwise glibc hands out the multi-GB buffers
of every S-size train step as fresh 4 KiB-page mappings, about 1.4 million page faults (2-3 s
of system time) per step.
"""

import sys

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

from igpt.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
