"""Fine-tune a pretrained iGPT classifier; report the best model's test accuracy.

Resumes automatically when the workdir has checkpoints. The best model (by validation
accuracy) is the igpt model dir WORKDIR/best; export it to transformers with
`python scripts/convert.py --to_hf=WORKDIR/best --out=DIR`.

  python scripts/finetune.py --config=configs/finetune.py --config.init_from=runs/digits \
      --workdir=runs/digits-finetune
  python scripts/finetune.py --config=configs/finetune.py:dataset=cifar10 \
      --config.init_from=models/igpt-s --workdir=runs/cifar10-finetune

Exit status: 0 done, 1 failed, 2 bad command line, 75 preempted (rerun to resume).
"""

from igpt.runtime import relaunch_with_malloc_tunables

relaunch_with_malloc_tunables()

from igpt import cli

cli.define_config_flags()


def main():
    from igpt.distributed import initialize_from_env
    from igpt.train.finetune import finetune

    initialize_from_env()
    finetune(cli.FLAGS.config, cli.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
