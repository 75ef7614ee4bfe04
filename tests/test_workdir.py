"""A workdir that cannot be corrupted: locking, config fingerprints, values checked before
anything is written, finite checkpoints, recovery from damaged checkpoints, finishing what a
killed run still owed."""

import json
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import GREYS, ROOT, config_from, flags

import igpt
from igpt.lock import DirectoryLock, LockedError
from igpt.train import checkpoints
from igpt.train.pretrain import FINAL_METRICS, pretrain

SMALL = {
    "model.n_embd": "32",
    "model.n_layer": "2",
    "model.n_head": "2",
    "model.n_inner": "128",
    "batch_size": "16",
    "num_steps": "20",
    "log_every": "10",
    "eval_every": "0",
    "checkpoint_every": "10",
    "data.palette_pixels": "20000",
    "data.val": "digits:train[1100:1164]",
    "sample.num_samples": "0",
}


def _config(**overrides):
    return config_from("digits.py", SMALL | overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20); tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    pretrain(_config(), workdir)
    return workdir


def _copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _cli(workdir, **overrides):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config=configs/digits.py",
            f"--workdir={workdir}", *flags(SMALL | overrides)]  # fmt: skip


# -- 1. one run per workdir --------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    with DirectoryLock(tmp_path):
        result = subprocess.run(_cli(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is in use by another run (host" in result.stderr and "pid" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_lock_left_by_a_killed_process_does_not_block_a_restart(tmp_path):
    script = (
        "import time\nfrom igpt.lock import DirectoryLock\n"
        f"with DirectoryLock({str(tmp_path)!r}):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        DirectoryLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with DirectoryLock(tmp_path):  # the kernel released it with the process
        pass


# -- 2, 3. the config a workdir was started with -------------------------------------------


def test_a_resume_with_another_trajectory_is_refused_and_nothing_is_overwritten(trained, tmp_path):
    tmp_path = _copy(trained, tmp_path)
    stored = (tmp_path / "config.json").read_text()
    for change, named in [
        ({"batch_size": "32"}, "batch_size: 16 -> 32"),
        ({"model.n_embd": "64"}, "model.n_embd: 32 -> 64"),
        ({"seed": "1", "optimizer.learning_rate": "1e-4"}, "optimizer.learning_rate"),
    ]:
        with pytest.raises(ValueError, match="cannot resume") as error:
            pretrain(_config(**change), tmp_path)
        assert named in str(error.value) and "\n" not in str(error.value)
    assert (tmp_path / "config.json").read_text() == stored
    assert checkpoints.latest_step(tmp_path) == 20


def test_a_workdir_from_before_a_setting_existed_resumes_at_its_default(trained, tmp_path):
    # A workdir made before igpt had model.objective (and model.mask_prob) computed "ar".
    tmp_path = _copy(trained, tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    for field in ("objective", "mask_prob"):
        del stored["model"][field]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="model.objective: None -> 'bert'"):
        pretrain(_config(**{"model.objective": "bert"}), tmp_path)
    pretrain(_config(num_steps="30"), tmp_path)
    assert checkpoints.latest_step(tmp_path) == 30


def test_changes_that_keep_the_trajectory_are_allowed_and_recorded(trained, tmp_path):
    tmp_path = _copy(trained, tmp_path)
    stored = (tmp_path / "config.json").read_text()
    pretrain(_config(num_steps="30", log_every="5", checkpoint_every="5"), tmp_path)
    assert checkpoints.latest_step(tmp_path) == 30
    assert (tmp_path / "config.json").read_text() == stored  # the record of how it started
    (resume,) = [json.loads(x) for x in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 20
    assert resume["changes"]["num_steps"] == [20, 30] and "log_every" in resume["changes"]


def test_a_palette_that_disagrees_with_the_workdirs_is_an_error(trained, tmp_path):
    # Asking for another palette file changes the config: refused as such.
    run = _copy(trained, tmp_path)
    np.save(tmp_path / "grey.npy", GREYS)
    with pytest.raises(ValueError, match="data.palette: 'fit' ->"):
        pretrain(_config(**{"data.palette": str(tmp_path / "grey.npy")}), run)
    # The same file name whose contents changed since the run started: refused too.
    config = _config(num_steps="10", **{"data.palette": str(tmp_path / "grey.npy")})
    pretrain(config, tmp_path / "from_file")
    np.save(tmp_path / "grey.npy", GREYS[::-1].copy())
    with pytest.raises(ValueError, match="differs from the palette"):
        pretrain(config, tmp_path / "from_file")


# -- 4. values checked before anything is created --------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep_checkpoints": "-1"}, "keep_checkpoints"),
        ({"checkpoint_every": "0"}, "checkpoint_every"),
        ({"log_every": "0"}, "log_every"),
        ({"num_steps": "-5"}, "num_steps"),
        ({"optimizer.learning_rate": float("inf")}, "learning_rate"),
        ({"data.augment": "random_resized_crop"}, "augmentation"),
        ({"optimizer.schedule": "linear"}, "schedule"),
        ({"mesh_shape": "(2,1,1)"}, "mesh"),
        ({"batch_size": "15", "grad_accum_steps": "2"}, "grad_accum_steps"),
    ],
)
def test_bad_values_are_refused_before_the_workdir_is_touched(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        pretrain(_config(**change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_keep_checkpoints_zero_keeps_every_checkpoint(tmp_path):
    pretrain(_config(num_steps="30", keep_checkpoints="0"), tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20, 30]


# -- 5. never a non-finite checkpoint ----------------------------------------------------------


def test_a_non_finite_update_is_never_saved_and_the_message_names_a_finite_checkpoint(tmp_path):
    # eps=0: Adam divides zero moments by zero for parameters without gradient (the padding
    # rows of the embedding), so the loss of step N is finite while the state after it is NaN.
    config = _config(num_steps="20", checkpoint_every="1", **{"optimizer.eps": "0.0"})
    with pytest.raises(FloatingPointError) as error:
        pretrain(config, tmp_path)
    message = str(error.value)
    assert "optimizer.eps" in message
    step = checkpoints.latest_step(tmp_path)
    assert f"step {step}" in message if step is not None else "no checkpoint" in message
    if step is not None:
        params = igpt.load_model(tmp_path).params
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# -- 7. a kill during the final evaluation ------------------------------------------------------


def test_a_run_killed_before_its_final_evaluation_finishes_it_on_restart(trained, tmp_path):
    tmp_path = _copy(trained, tmp_path)
    expected = json.loads((tmp_path / FINAL_METRICS).read_text())
    (tmp_path / FINAL_METRICS).unlink()  # as if killed after the last checkpoint
    assert pretrain(_config(), tmp_path) == expected
    assert json.loads((tmp_path / FINAL_METRICS).read_text()) == expected


# -- 9. damaged checkpoints ----------------------------------------------------------------------


def _damage_truncated(step_dir):
    victim = max((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def _damage_missing_item(step_dir):
    shutil.rmtree(step_dir / "params")


def _damage_metadata(step_dir):
    for path in step_dir.rglob("*metadata*"):
        if path.is_file():
            path.write_text("{ not json")


@pytest.mark.parametrize("damage", [_damage_truncated, _damage_missing_item, _damage_metadata])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
    trained, tmp_path, damage, capsys
):
    run = _copy(trained, tmp_path)
    damage(run / "checkpoints" / "20")
    (run / FINAL_METRICS).unlink()
    loaded = igpt.load_model(run)
    assert loaded.step == 10
    pretrain(_config(), run)  # resumes from 10 and trains steps 11-20 again
    out = capsys.readouterr().out
    assert "checkpoint 20" in out and "damaged" in out and "resumed from step 10" in out
    assert (run / "checkpoints" / "20.damaged").is_dir()  # kept for inspection
    resumed = jax.tree.leaves(igpt.load_model(run).params)
    straight = jax.tree.leaves(igpt.load_model(trained).params)
    for a, b in zip(resumed, straight, strict=True):
        np.testing.assert_array_equal(a, b)


# -- 6. images of other modes ---------------------------------------------------------------


def _png16_rgb(path, array):
    """A 48-bit RGB PNG, which PIL reads but cannot write."""
    import struct
    import zlib

    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip


def test_16_bit_palette_and_cmyk_images_become_the_right_8_bit_rgb(tmp_path):
    from PIL import Image

    from igpt.pixels import load_image, to_rgb

    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in steps
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = to_rgb(load_image(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(grey[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert grey.max() == 255 and len(np.unique(grey)) == 256  # not crushed to black and white

    rgb16 = np.stack([ramp, ramp // 2, 65535 - ramp], -1)
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    rgb = to_rgb(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(rgb - rgb16 / 257).max() <= 1

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)  # transparent: white, as the transformers processor composites
    pixels = to_rgb(palette)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[1, 1]) == (200, 10, 30)

    cmyk = to_rgb(Image.new("CMYK", (2, 2), (0, 255, 0, 0)))
    assert tuple(cmyk[0, 0]) == (255, 0, 255)  # no magenta ink removed: magenta
    with pytest.raises(ValueError, match="32-bit float image"):
        to_rgb(Image.new("F", (2, 2)))


# -- 8. outputs that are written whole or not at all --------------------------------------------


def test_convert_refuses_to_overwrite_in_both_directions(tmp_path, digits_model_dir):
    from conftest import run_script

    assert run_script("convert", f"--to_hf={digits_model_dir}", f"--out={tmp_path / 'hf'}")
    (tmp_path / "out").mkdir()
    for way, source in (("to_hf", digits_model_dir), ("from_hf", tmp_path / "hf")):
        result = run_script("convert", f"--{way}={source}", f"--out={tmp_path / 'out'}")
        assert result.returncode == 1 and "exists" in result.stderr, result.stderr
    assert not list((tmp_path / "out").iterdir())


def test_sample_writes_both_files_or_neither_and_creates_parents(tmp_path, digits_model_dir):
    from conftest import run_script

    out = tmp_path / "new" / "dir" / "s.png"
    assert (
        run_script("sample", f"--model={digits_model_dir}", f"--out={out}", "--num=2").returncode
        == 0
    )
    assert out.exists() and out.with_suffix(".npz").exists()
    bad = tmp_path / "bad.png"
    bad.mkdir()  # the PNG cannot be written over a directory
    result = run_script("sample", f"--model={digits_model_dir}", f"--out={bad}", "--num=2")
    assert result.returncode == 2 and "is a directory" in result.stderr
    assert bad.is_dir() and not bad.with_suffix(".npz").exists()


# -- 10, 12. one-line errors for bad files --------------------------------------------------------


def test_bad_checkpoint_files_are_one_line_errors(tmp_path):
    from reference_models import random_hf_model

    from igpt.convert import load_hf

    hf = random_hf_model(seed=1, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    hf.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        load_hf(tmp_path / "cut")

    import pickle

    hf.save_pretrained(tmp_path / "pickle")
    (tmp_path / "pickle" / "model.safetensors").unlink()
    with open(tmp_path / "pickle" / "pytorch_model.bin", "wb") as file:
        pickle.dump({"x": print}, file)  # not tensors: refused by weights_only=True
    with pytest.raises(ValueError, match="weights_only=True"):
        load_hf(tmp_path / "pickle")

    hf.save_pretrained(tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"weight_map": {"lm_head.weight": "../outside.safetensors"}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        load_hf(tmp_path / "sharded")


def test_bad_inputs_of_the_scripts_are_one_line_errors(tmp_path):
    from conftest import run_script

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps({"optimizer": {}}))
    cases = [
        (("fit_palette", "--data=digits:train[:2]", "--k=600", f"--out={tmp_path / 'p.npy'}",
          "--size=8"), "k must be between 1 and the number of pixels"),
        (("fit_palette", f"--data=folder:{tmp_path / 'none'}", f"--out={tmp_path / 'p.npy'}"),
         "is not a directory"),
        (("probe", "--config=configs/probe.py", f"--workdir={tmp_path / 'pr'}",
          f"--config.init_from={tmp_path / 'w'}"), "without a checkpoint yet"),
    ]  # fmt: skip
    for args, message in cases:
        result = run_script(*args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    from igpt.data import open_source

    with pytest.raises(ValueError, match="is not an .npz archive") as error:
        open_source(f"npz:{tmp_path / 'x.npz'}")
    assert "allow_pickle" not in str(error.value)


def test_a_corrupt_validation_image_stops_the_run_before_training(tmp_path):
    from PIL import Image

    for i in range(3):
        folder = tmp_path / "val" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "val" / "c1" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        pretrain(_config(**{"data.val": f"folder:{tmp_path / 'val'}"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
