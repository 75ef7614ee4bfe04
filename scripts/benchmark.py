"""Benchmark igpt (forward, train step, sampling, tokenizer), optionally against transformers.

python scripts/benchmark.py --preset tiny --mode sample,train --vs-hf
python scripts/benchmark.py --preset s --batch 2 --mode train --vs-hf --repeats 2
python scripts/benchmark.py --d 128 --layers 4 --heads 4 --side 16 --mode sample --vs-hf

Prints one JSON line per measurement, then a table; see igpt/benchmark.py for the FLOP count.

On Linux the script restarts itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: glibc
otherwise hands out the multi-GB buffers that XLA and torch allocate for every train step as
fresh 4 KiB-page mappings, about 1.4 million page faults (2-3 s of system time) per S-size
step for either framework. Set GLIBC_TUNABLES yourself (even to nothing) to skip this.
"""

import os
import sys

if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"  # read by glibc at process start
    os.execv(sys.executable, [sys.executable, *sys.argv])

from igpt.benchmark import main  # noqa: E402 - after the restart above

if __name__ == "__main__":
    sys.exit(main())
