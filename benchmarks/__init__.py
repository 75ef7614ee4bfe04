"""Benchmarks of igpt against transformers' PyTorch ImageGPT; outside the library (torch lives
here, never under igpt/). Run from the repository root: `python -m benchmarks --help`."""
