"""Linear-probe every layer of a checkpoint (writes probe.json and probe_accuracy.png).

  python scripts/probe.py --config configs/probe.py --config.checkpoint=runs/digits \
      --workdir runs/digits-probe
  python scripts/probe.py --config configs/probe.py:dataset=cifar10,labels_per_class=25 \
      --config.checkpoint=models/igpt-s --workdir runs/cifar10-probe-25
"""

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

from igpt.cli import fail, parse_run_args
from igpt.distributed import initialize_from_env


def main(argv=None):
    config, args = parse_run_args(__doc__.splitlines()[0], argv)
    initialize_from_env()
    from igpt.probe import run_probe

    try:
        run_probe(config, args.workdir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail("probe", e)


if __name__ == "__main__":
    main()
