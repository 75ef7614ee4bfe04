"""Sample images from an ImageGPT model, or complete images from their top rows, into a PNG grid.

  python scripts/sample.py --model=models/igpt-s --out=samples.png --num=16 --top_k=64
  python scripts/sample.py --model=openai-imagegpt-small/ --out=completions.png \
      --complete=cat.png,dog.jpg --rows_kept=0.5 --num=4

--model is an igpt model directory, a training workdir or a transformers ImageGPT directory.
The ids go to a .npz beside the PNG (`ids`; in completion mode also `inputs`, the encoded input
images); both files are written, or neither.
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from pathlib import Path

from absl import flags

from igpt import cli

flags.DEFINE_string("model", None, "igpt model dir, training workdir or transformers dir",
                    required=True)  # fmt: skip
flags.DEFINE_string("out", None, "PNG file to write (ids go to a .npz beside it)", required=True)
flags.DEFINE_list("complete", [], "image files or directories to complete (comma-separated)")
flags.DEFINE_float("rows_kept", 0.5, "fraction of rows kept as the prompt")
flags.DEFINE_integer("num", 16, "samples, or completions per image", lower_bound=1)
flags.DEFINE_float("temperature", 1.0, "0 = greedy", lower_bound=0)
flags.DEFINE_integer("top_k", None, "sample among the k most likely colours")
flags.DEFINE_float("top_p", None, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("batch_size", 16, "samples per compiled call", lower_bound=1)
flags.DEFINE_string("palette", None, "palette (.npy or transformers dir) for models without one")
flags.DEFINE_integer("scale", None, "pixel upscale (default: to about 96 pixels)", lower_bound=1)
FLAGS = flags.FLAGS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_paths(entries: list[str]) -> list[Path]:
    """Image files named directly or found (sorted) in the named directories."""
    paths = []
    for entry in map(Path, entries):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise cli.UsageError(f"--complete directory {entry} holds no image files")
            paths += found
        elif entry.is_file():
            paths.append(entry)
        else:
            raise cli.UsageError(f"--complete: {entry} does not exist")
    return paths


def main():
    import jax
    import numpy as np

    from igpt import figures, files
    from igpt.loading import load_model, read_palette
    from igpt.sampling import check_samplable, complete, rows_to_prompt_len, sample_batched
    from igpt.tokenizer import ColorTokenizer

    out = Path(FLAGS.out)
    if out.is_dir() or out.with_suffix(".npz").is_dir():
        raise cli.UsageError(f"--out={out} (or its .npz) is a directory; name a .png file")
    model = load_model(FLAGS.model)
    config, params = model.config, model.params
    check_samplable(config)
    palette = read_palette(FLAGS.palette) if FLAGS.palette else model.palette
    if palette is None:
        raise cli.UsageError(
            f"{FLAGS.model} has no palette (palette.npy or preprocessor_config.json); pass "
            "--palette=palette.npy"
        )
    if len(palette) != config.palette_size:
        raise cli.UsageError(
            f"the palette has {len(palette)} colours but the model predicts {config.palette_size}"
        )
    side = config.image_side
    tokenizer = ColorTokenizer(palette, size=side)
    options = dict(
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        batch_size=FLAGS.batch_size, progress=True,
    )  # fmt: skip
    rng = jax.random.key(FLAGS.seed)
    scale = FLAGS.scale or figures.auto_scale(side)
    if FLAGS.complete:
        paths = image_paths(FLAGS.complete)
        inputs = tokenizer.encode([str(p) for p in paths])
        ids = complete(
            config, params, rng, inputs, rows_kept=FLAGS.rows_kept, num_completions=FLAGS.num,
            **options,
        )  # fmt: skip
        kept = rows_to_prompt_len(config, FLAGS.rows_kept) // side
        decoded = tokenizer.decode(ids.reshape(-1, ids.shape[-1])).reshape(*ids.shape[:2], side,
                                                                           side, 3)  # fmt: skip
        picture = figures.completion_sheet(tokenizer.decode(inputs), decoded, kept, scale)
        arrays = {"ids": ids, "inputs": inputs}
        what = f"{len(paths)} images x {FLAGS.num} completions ({kept} of {side} rows kept)"
    else:
        ids = sample_batched(config, params, rng, num_samples=FLAGS.num, **options)
        picture = figures.sample_sheet(tokenizer.decode(ids), scale)
        arrays = {"ids": ids}
        what = f"{FLAGS.num} samples"
    with files.atomic_path(out) as png, files.atomic_path(out.with_suffix(".npz")) as npz:
        figures.save_png(png, picture)
        np.savez(npz, **arrays)
    print(f"wrote {out} ({what}, {picture.shape[1]}x{picture.shape[0]} px) and ids to "
          f"{out.with_suffix('.npz')}")  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
