"""Pretrain an iGPT model (resumes automatically when the workdir has checkpoints).

  python scripts/train.py --config configs/digits.py --workdir runs/digits
  python scripts/train.py --config configs/pretrain.py:dataset=cifar10,model=s \
      --workdir runs/cifar10-s --config.batch_size=64
"""

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

from igpt.cli import fail, parse_run_args
from igpt.distributed import initialize_from_env


def main(argv=None):
    config, args = parse_run_args(__doc__.splitlines()[0], argv)
    initialize_from_env()
    from igpt.pretrain import NonFiniteLossError, train

    try:
        train(config, args.workdir)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
        fail("train", e)


if __name__ == "__main__":
    main()
