"""Pretrain an iGPT model (resumes automatically when the workdir has checkpoints).

  python scripts/train.py --config=configs/digits.py --workdir=runs/digits
  python scripts/train.py --config=configs/pretrain.py:dataset=cifar10,model=s \
      --workdir=runs/cifar10-s --config.batch_size=64

Exit status: 0 done, 1 failed, 2 bad command line, 75 preempted (rerun to resume).
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from igpt import cli

cli.define_config_flags()


def main():
    from igpt.distributed import initialize_from_env
    from igpt.train.pretrain import pretrain

    initialize_from_env()
    pretrain(cli.FLAGS.config, cli.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
