"""Convert between transformers ImageGPT checkpoints and igpt model directories.

python scripts/convert.py --from_hf=openai/imagegpt-small --out=models/igpt-s
python scripts/convert.py --to_hf=models/igpt-s --out=hf/igpt-s
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from absl import flags

from igpt import cli

flags.DEFINE_string("from_hf", None, "transformers directory or hub id to read")
flags.DEFINE_string("to_hf", None, "igpt model directory (or training workdir) to export")
flags.DEFINE_string("out", None, "directory to write", required=True)
flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
flags.mark_flags_as_mutual_exclusive(["from_hf", "to_hf"], required=True)
FLAGS = flags.FLAGS


def main():
    from pathlib import Path

    import igpt

    if Path(FLAGS.out).exists() and not FLAGS.overwrite:
        raise FileExistsError(f"--out={FLAGS.out} exists; pass --overwrite to replace it")
    if FLAGS.from_hf:
        config, params, palette = igpt.load_hf(FLAGS.from_hf)
        out = igpt.save_model(FLAGS.out, config, params, palette, overwrite=FLAGS.overwrite)
    else:
        model = igpt.load_model(FLAGS.to_hf)
        config, params = model.config, model.params
        out = igpt.save_hf(config, params, FLAGS.out, model.palette, overwrite=FLAGS.overwrite)
    n = igpt.count_params(params)
    print(f"wrote {out} ({n:,} parameters, d={config.n_embd}, layers={config.n_layer})")


if __name__ == "__main__":
    cli.run(main)
