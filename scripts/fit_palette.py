"""Fit a k-means colour palette to a data source and save it.

  python scripts/fit_palette.py --data=tfds:cifar10:train --k=512 --out=palette.npy \
      [--num_pixels=1000000] [--seed=0] [--size=32] [--num_iters=100] \
      [--preprocessor_config=DIR]

--data takes any spec of igpt.data.open_source (tfds:NAME[:SPLIT], digits[:SPLIT],
folder:PATH, npz:PATH, idx:DIR[:SPLIT], with an optional slice). --size resizes images to the
model resolution before sampling, as the tokenizer will. --preprocessor_config also writes a
transformers preprocessor_config.json into DIR, so `ImageGPTImageProcessor.from_pretrained(DIR)`
and `ColorTokenizer.from_pretrained(DIR)` read the palette.
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from absl import flags

from igpt import cli

flags.DEFINE_string("data", None, "data source spec, e.g. tfds:cifar10", required=True)
flags.DEFINE_integer("k", 512, "number of colours", lower_bound=1)
flags.DEFINE_string("out", None, "output .npy palette (K, 3) in [-1, 1]", required=True)
flags.DEFINE_integer("num_pixels", 1_000_000, "pixels to fit on", lower_bound=1)
flags.DEFINE_integer("seed", 0, "sampling and k-means++ seed")
flags.DEFINE_integer("size", None, "resize images to SIZE x SIZE first", lower_bound=1)
flags.DEFINE_integer("num_iters", 100, "most Lloyd iterations", lower_bound=1)
flags.DEFINE_bool("skip_corrupt", False, "skip unreadable images")
flags.DEFINE_string("preprocessor_config", None, "also write preprocessor_config.json here")
flags.register_validator("out", lambda out: out.endswith(".npy"), "--out must name a .npy file")
FLAGS = flags.FLAGS


def main():
    from igpt import files
    from igpt.data import open_source
    from igpt.kmeans import fit_palette, sample_pixels
    from igpt.tokenizer import DEFAULT_SIZE, ColorTokenizer

    source = open_source(FLAGS.data, skip_corrupt=FLAGS.skip_corrupt)
    pixels = sample_pixels(source, FLAGS.num_pixels, size=FLAGS.size, seed=FLAGS.seed)
    palette, _ = fit_palette(pixels, FLAGS.k, seed=FLAGS.seed, num_iters=FLAGS.num_iters)
    tokenizer = ColorTokenizer(palette, size=FLAGS.size or DEFAULT_SIZE)
    print(f"wrote {files.save_npy(FLAGS.out, tokenizer.palette)}")
    if FLAGS.preprocessor_config:
        print(f"wrote {tokenizer.save_pretrained(FLAGS.preprocessor_config)}")


if __name__ == "__main__":
    cli.run(main)
