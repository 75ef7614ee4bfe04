"""Convert between transformers ImageGPT checkpoints and igpt model directories.

python scripts/convert.py --from-hf openai/imagegpt-small --out models/igpt-s
python scripts/convert.py --to-hf models/igpt-s --out hf/igpt-s
"""

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

import argparse
import sys

import igpt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="SRC", help="transformers directory or hub id")
    source.add_argument("--to-hf", metavar="SRC", help="igpt model directory")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            config, params, clusters = igpt.load_hf(args.from_hf)
            out = igpt.save_model(args.out, config, params, clusters, overwrite=args.overwrite)
        else:
            config, params, clusters = igpt.load_model(args.to_hf)
            out = igpt.save_hf(config, params, args.out, clusters)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    n = igpt.count_params(params)
    print(f"wrote {out} ({n:,} parameters, d={config.n_embd}, layers={config.n_layer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
