"""Command lines (igpt/cli.py): config files, checked overrides, one-line errors, exit codes."""

import json

import pytest
from conftest import ROOT, run_script

from igpt.cli import UsageError, check_key, load_config


def test_config_keys_are_checked_with_the_closest_valid_one():
    config = load_config(str(ROOT / "configs" / "digits.py"))
    check_key(config, "optimizer.learning_rate")
    with pytest.raises(UsageError, match="did you mean 'optimizer.learning_rate'"):
        check_key(config, "optimizer.learning_rat")
    with pytest.raises(UsageError, match="is a group of settings"):
        check_key(config, "optimizer")
    with pytest.raises(UsageError, match="does not exist"):
        load_config("configs/nope.py")
    with pytest.raises(UsageError, match="dataset='nope'"):
        load_config(str(ROOT / "configs" / "pretrain.py") + ":dataset=nope")


def test_overrides_reach_the_config_with_their_types(tmp_path):
    # A run that stops at once (num_steps=0) records the config it resolved.
    args = ["--config=configs/digits.py", f"--workdir={tmp_path}", "--config.num_steps=0",
            "--config.optimizer.learning_rate=1e-4", "--config.mesh_shape=(1,1,1)",
            "--config.model.remat=true", "--config.data.val="]  # fmt: skip
    result = run_script("train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 1e-4 and config["mesh_shape"] == [1, 1, 1]
    assert config["model"]["remat"] is True and config["num_steps"] == 0


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.optimizer.lr=1", "optimizer has no key 'lr'"),
        ("--config.batch_size=many", "--config.batch_size=many"),
        ("--bogus=1", "bogus"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line_before_running(tmp_path, flag, message):
    result = run_script("train", "--config=configs/digits.py", f"--workdir={tmp_path / 'w'}", flag)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
