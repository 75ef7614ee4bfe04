"""Sample images from an ImageGPT model, or complete images from their top rows, into a PNG grid.

python scripts/sample.py --checkpoint models/igpt-s --out samples.png --num 16 --top-k 64
python scripts/sample.py --checkpoint openai-imagegpt-small/ --out completions.png \
    --complete cat.png dog.jpg --rows-kept 0.5 --num 4

--checkpoint is an igpt model directory or a transformers ImageGPT directory. The ids go to a
.npz beside the PNG (`ids`; in completion mode also `inputs`, the encoded input images).
"""

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from igpt import images
from igpt.checkpoint import load_pretrained
from igpt.sampling import complete, rows_to_prompt_len, sample_batched
from igpt.tokenizer import ColorTokenizer

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UsageError(Exception):
    """A bad input, reported as one line without a traceback."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="igpt model or transformers dir")
    parser.add_argument("--out", required=True, help="PNG file to write (ids go to .npz)")
    parser.add_argument("--complete", nargs="+", metavar="IMAGE", help="image files or dirs")
    parser.add_argument("--rows-kept", type=float, default=0.5, help="fraction of rows kept")
    parser.add_argument("--num", type=int, default=16, help="samples, or completions per image")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per compiled call")
    parser.add_argument("--clusters", help=".npy palette, for checkpoints without clusters")
    parser.add_argument("--scale", type=int, default=None, help="pixel upscale (default auto)")
    return parser.parse_args(argv)


def load(args):
    """(config, params, tokenizer) from the checkpoint and, if given, the palette file."""
    try:
        config, params, clusters = load_pretrained(args.checkpoint)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load --checkpoint {args.checkpoint}: {e}") from None
    if args.clusters:
        try:
            clusters = np.load(args.clusters)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --clusters {args.clusters}: {e}") from None
    if clusters is None:
        raise UsageError(
            f"{args.checkpoint} has no colour clusters (no clusters.npy or "
            "preprocessor_config.json); pass the palette with --clusters palette.npy"
        )
    if len(clusters) != config.num_clusters:
        raise UsageError(
            f"the palette has {len(clusters)} colours but the model predicts "
            f"{config.num_clusters} clusters"
        )
    side = config.image_side
    try:
        tokenizer = ColorTokenizer(clusters, size=(side, side))
    except ValueError as e:
        raise UsageError(f"bad colour clusters: {e}") from None
    return config, params, tokenizer


def image_paths(entries: list[str]) -> list[Path]:
    """Image files named directly or found (sorted) in the named directories."""
    paths = []
    for entry in map(Path, entries):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"--complete directory {entry} holds no image files")
            paths += found
        elif entry.is_file():
            paths.append(entry)
        else:
            raise UsageError(f"--complete: {entry} does not exist")
    return paths


def run(args) -> str:
    if args.num < 1 or args.batch_size < 1:
        raise UsageError("--num and --batch-size must be >= 1")
    config, params, tokenizer = load(args)
    side = config.image_side
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    rng = jax.random.key(args.seed)
    scale = args.scale or images.auto_scale(side)
    out = Path(args.out)
    if args.complete:
        paths = image_paths(args.complete)
        try:
            inputs = tokenizer.encode([str(p) for p in paths])
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot read the --complete images: {e}") from None
        ids = complete(
            config,
            params,
            rng,
            inputs,
            rows_kept=args.rows_kept,
            num_completions=args.num,
            batch_size=args.batch_size,
            progress=True,
            **options,
        )
        kept = rows_to_prompt_len(config, args.rows_kept) // side
        picture = images.completion_sheet(
            tokenizer.decode(inputs), _decode_nested(tokenizer, ids), kept, scale
        )
        np.savez(out.with_suffix(".npz"), ids=ids, inputs=inputs)
        what = f"{len(paths)} images x {args.num} completions ({kept} of {side} rows kept)"
    else:
        ids = sample_batched(
            config,
            params,
            rng,
            num_samples=args.num,
            batch_size=args.batch_size,
            progress=True,
            **options,
        )
        picture = images.sample_sheet(tokenizer.decode(ids), scale)
        np.savez(out.with_suffix(".npz"), ids=ids)
        what = f"{args.num} samples"
    images.save_png(out, picture)
    return f"wrote {out} ({what}, {picture.shape[1]}x{picture.shape[0]} px) and ids to " + str(
        out.with_suffix(".npz")
    )


def _decode_nested(tokenizer: ColorTokenizer, ids: np.ndarray) -> np.ndarray:
    """(N, C, T) ids -> (N, C, H, W, 3) pixels."""
    pixels = tokenizer.decode(ids.reshape(-1, ids.shape[-1]))
    return pixels.reshape(*ids.shape[:2], *pixels.shape[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except (UsageError, ValueError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
