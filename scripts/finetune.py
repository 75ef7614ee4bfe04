"""Fine-tune a pretrained iGPT classifier; report the best model's test accuracy.

Resumes automatically when the workdir has checkpoints. The best model (by validation
accuracy) is the igpt model dir WORKDIR/best; export it to transformers with
`python scripts/convert.py --to-hf WORKDIR/best --out DIR`.

  python scripts/finetune.py --config configs/finetune.py --config.init_from=runs/digits \
      --workdir runs/digits-finetune
  python scripts/finetune.py --config configs/finetune.py:dataset=cifar10 \
      --config.init_from=models/igpt-s --workdir runs/cifar10-finetune
"""

from igpt.runtime import relaunch_with_huge_pages

relaunch_with_huge_pages()

from igpt.cli import fail, parse_run_args
from igpt.distributed import initialize_from_env


def main(argv=None):
    config, args = parse_run_args(__doc__.splitlines()[0], argv)
    initialize_from_env()
    from igpt.finetune import finetune
    from igpt.pretrain import NonFiniteLossError

    try:
        finetune(config, args.workdir)
    except (NonFiniteLossError, ValueError, FileNotFoundError, RuntimeError) as e:
        fail("finetune", e)


if __name__ == "__main__":
    main()
