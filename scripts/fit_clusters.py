"""Fit a k-means colour palette to a data source and save it.

    python scripts/fit_clusters.py --data tfds:cifar10:train --k 512 --out palette.npy \
        [--num-pixels 1000000] [--seed 0] [--size 32] [--num-iters 100] \
        [--preprocessor-config DIR]

--data takes any spec of igpt.data.open_source (tfds:NAME[:SPLIT], digits[:SPLIT],
folder:PATH, npz:PATH, with an optional slice). --size resizes images to the model resolution
before sampling, as the tokenizer will. --preprocessor-config also writes a transformers
preprocessor_config.json into DIR, so `ImageGPTImageProcessor.from_pretrained(DIR)` and
`ColorTokenizer.from_pretrained(DIR)` read the palette.
"""

from __future__ import annotations

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

import argparse

from igpt.data import open_source
from igpt.kmeans import fit_clusters, sample_pixels
from igpt.tokenizer import DEFAULT_SIZE, ColorTokenizer


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, sample pixels, fit, write the palette."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="data source spec, e.g. tfds:cifar10")
    parser.add_argument("--k", type=int, default=512, help="number of colour clusters")
    parser.add_argument("--out", required=True, help="output .npy palette (K, 3) in [-1, 1]")
    parser.add_argument("--num-pixels", type=int, default=1_000_000, help="pixels to fit on")
    parser.add_argument("--seed", type=int, default=0, help="sampling and k-means++ seed")
    parser.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    parser.add_argument("--num-iters", type=int, default=100, help="max Lloyd iterations")
    parser.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images")
    parser.add_argument(
        "--preprocessor-config", default=None, help="also write preprocessor_config.json here"
    )
    args = parser.parse_args(argv)
    if not args.out.endswith(".npy"):
        parser.error(f"--out must name a .npy file, got {args.out!r}")

    source = open_source(args.data, skip_corrupt=args.skip_corrupt)
    pixels = sample_pixels(source, args.num_pixels, size=args.size, seed=args.seed)
    clusters, _ = fit_clusters(pixels, args.k, seed=args.seed, num_iters=args.num_iters)
    tokenizer = ColorTokenizer(clusters, size=args.size or DEFAULT_SIZE)
    tokenizer.save(args.out)
    print(f"wrote {args.out}")
    if args.preprocessor_config:
        print(f"wrote {tokenizer.save_pretrained(args.preprocessor_config)}")


if __name__ == "__main__":
    main()
