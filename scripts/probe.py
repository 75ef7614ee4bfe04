"""Linear-probe every layer of a model (writes probe.json and probe_accuracy.png).

  python scripts/probe.py --config=configs/probe.py --config.init_from=runs/digits \
      --workdir=runs/digits/probe
  python scripts/probe.py --config=configs/probe.py:dataset=cifar10,labels_per_class=25 \
      --config.init_from=models/igpt-s --workdir=runs/cifar10-probe-25
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from igpt import cli

cli.define_config_flags()


def main():
    from igpt.distributed import initialize_from_env
    from igpt.probe import run_probe

    initialize_from_env()
    run_probe(cli.FLAGS.config, cli.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
