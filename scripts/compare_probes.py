"""Probe test accuracy by layer of several probe runs on one PNG (e.g. the AR and BERT
objectives, as the paper compares them).

  python scripts/compare_probes.py --probe=AR=runs/fashion/probe \
      --probe=BERT=docs/fashion_bert_probe.json --out=docs/fashion_ar_vs_bert.png
"""

from absl import flags

from igpt import cli

flags.DEFINE_multi_string("probe", None, "NAME=DIR of a probe run, or NAME=its probe.json; repeat",
                          required=True)  # fmt: skip
flags.DEFINE_string("out", None, "PNG file to write", required=True)
FLAGS = flags.FLAGS


def main():
    from igpt.probe import plot_probe_comparison, read_probe

    results = {}
    for item in FLAGS.probe:
        name, has_name, directory = item.partition("=")
        if not has_name or not name or not directory:
            raise cli.UsageError(f"--probe={item}: write NAME=DIR, e.g. --probe=AR=runs/x/probe")
        results[name] = read_probe(directory)
    if plot_probe_comparison(results, FLAGS.out) is None:
        raise cli.UsageError("matplotlib is missing: pip install igpt[plots]")
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
