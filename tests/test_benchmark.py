"""The benchmark harness at tiny sizes: its records, its FLOP count, its transformers twin."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import igpt
from benchmarks import bench as benchmark
from igpt.flops import forward_flops

TINY_ARGS = ["--d", "32", "--layers", "1", "--heads", "2", "--side", "4", "--batch", "2"]
TINY_ARGS += ["--sample-batch", "1,3", "--images", "8", "--repeats", "1"]


def _records(capsys, argv):
    assert benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    table = "\n".join(line for line in lines if not line.startswith("{"))
    return records, table


@pytest.mark.parametrize("vs_hf", [False, True])
def test_harness_reports_every_mode(capsys, tmp_path, vs_hf):
    out = tmp_path / "bench.jsonl"
    argv = TINY_ARGS + ["--json", str(out)] + (["--vs-hf"] if vs_hf else [])
    records, table = _records(capsys, argv)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records

    machine = records[0]
    assert machine["mode"] == "machine" and machine["matmul_peak_gflops"] > 0
    impls = ["igpt", "transformers"] if vs_hf else ["igpt"]
    cases = [r for r in records[1:] if r["impl"] in impls]
    expected = {
        (m, b, i)
        for m, b in [("forward", 2), ("train", 2), ("sample", 1), ("sample", 3)]
        for i in impls
    } | {("tokenize", 8, i) for i in impls}
    assert {(r["mode"], r["batch"], r["impl"]) for r in cases} == expected
    config = igpt.ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=16)
    per_sequence = forward_flops(config, 16)
    passes = {"forward": 1, "train": 3, "sample": 1}
    for r in cases:
        assert r["per_s"] > 0 and r["median_s"] >= r["best_s"] > 0 and r["warmup_s"] > 0
        if r["mode"] == "tokenize":
            assert r["flops"] is None
            continue
        assert r["flops"] == passes[r["mode"]] * r["batch"] * per_sequence
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["best_s"], rel=1e-3)
        assert r["fraction_of_peak"] == pytest.approx(
            r["flops_per_s"] / (machine["matmul_peak_gflops"] * 1e9), abs=2e-3
        )
    ratios = [r for r in records[1:] if r["impl"] == "igpt/transformers"]
    assert len(ratios) == (5 if vs_hf else 0)
    for ratio in ratios:
        mine, theirs = (
            next(
                r
                for r in cases
                if (r["mode"], r["batch"], r["impl"]) == (ratio["mode"], ratio["batch"], i)
            )
            for i in ("igpt", "transformers")
        )
        assert ratio["ratio"] == pytest.approx(mine["per_s"] / theirs["per_s"], rel=1e-4)
    assert "matmul peak" in table and "sample" in table

    # Sampling against this machine's bandwidth: a step reads the weights once and each
    # sequence's cache of the positions before it (2 x layers x d float32 per position, 8.5
    # positions on average over 16 tokens), so two more sequences add 2 x 2 x 32 x 4 x 8.5.
    samples = {r["batch"]: r for r in cases if r["mode"] == "sample" and r["impl"] == "igpt"}
    assert samples[3]["bytes_per_step"] - samples[1]["bytes_per_step"] == 2 * 2 * 32 * 4 * 8.5
    for batch, r in samples.items():
        bandwidth = r["read_bandwidth_gbs"] * 1e9
        assert bandwidth >= machine["read_bandwidth_gbs"] * 1e9
        assert r["limit_per_s"] == pytest.approx(batch * bandwidth / r["bytes_per_step"], 1e-4)
        assert r["fraction_of_limit"] == pytest.approx(r["per_s"] / r["limit_per_s"], abs=2e-3)


def test_the_sampling_limit_takes_the_best_bandwidth_so_far(capsys, monkeypatch):
    # Measured at the start (20 GB/s), then for each batch before its one round of calls and
    # after them: 30 and 35 for batch 1, 25 and 28 for batch 3. Every call takes 0.1 ms, which
    # puts the fractions of the limit near 1 at these sizes.
    readings = iter([20e9, 30e9, 35e9, 25e9, 28e9])
    monkeypatch.setattr(benchmark, "measure_bandwidth", lambda: next(readings))
    monkeypatch.setattr(benchmark, "_timed", lambda fn: (fn(), 1e-4)[1])
    records, table = _records(capsys, TINY_ARGS + ["--mode", "sample"])
    samples = [r for r in records if r["mode"] == "sample"]
    assert records[0]["read_bandwidth_gbs"] == 20
    assert [r["read_bandwidth_gbs"] for r in samples] == [35, 35]
    for r, before in zip(samples, [30e9, 25e9], strict=True):
        limit = r["batch"] * 35e9 / r["bytes_per_step"]
        assert r["limit_per_s"] == pytest.approx(limit, 1e-4)
        assert r["per_s"] == pytest.approx(r["batch"] * r["tokens"] / 1e-4)
        assert 0.3 < r["fraction_of_limit"] < 3
        # The adjacent fraction: the same call against the reading before its round.
        adjacent = r["fraction_of_limit"] * 35e9 / before
        assert r["fraction_of_adjacent_limit"] == pytest.approx(adjacent, rel=3e-3)
        assert f"{100 * r['fraction_of_adjacent_limit']:>7.1f}" in table


def test_loop_mode_times_the_training_loop_against_its_bare_step(capsys):
    argv = TINY_ARGS + ["--mode", "loop", "--loop-steps", "8"]
    records, table = _records(capsys, argv)
    loop, step, ratio = records[1:]
    assert (loop["impl"], step["impl"], ratio["impl"]) == ("igpt loop", "igpt step", "loop/step")
    # The best quarter of 8 steps: 2 steps of 2 sequences of 16 tokens.
    for r in (loop, step):
        assert r["per_s"] == pytest.approx(2 * 2 * 16 / r["best_s"], rel=1e-4)
    assert ratio["ratio"] == pytest.approx(loop["per_s"] / step["per_s"], rel=1e-4)
    assert "loop/step" in table


def test_loop_mode_runs_the_loop_and_its_bare_step_in_micro_batches(capsys, monkeypatch):
    import igpt.train.loop
    import igpt.train.step

    accumulated = []

    def spy(make):
        def make_and_record(*args, **kwargs):
            accumulated.append(kwargs["grad_accum_steps"])
            return make(*args, **kwargs)

        return make_and_record

    for module in (igpt.train.loop, igpt.train.step):
        monkeypatch.setattr(module, "make_train_step", spy(module.make_train_step))
    argv = TINY_ARGS + ["--mode", "loop", "--loop-steps", "8", "--micro-batches", "2"]
    records, table = _records(capsys, argv)
    assert accumulated == [2, 2]  # the loop's step, then the bare one
    assert [r["micro_batches"] for r in records[1:3]] == [2, 2]
    assert "loop        2/2 igpt loop" in table


def test_loop_mode_takes_the_bare_steps_best_quarter(capsys, monkeypatch):
    quarters = iter([3.0, 1.0, 2.0])  # the bare step's three timed quarters, in seconds
    monkeypatch.setattr(benchmark, "measure_bandwidth", lambda: 30e9)
    monkeypatch.setattr(benchmark, "_timed", lambda fn: (fn(), next(quarters))[1])
    records, _ = _records(capsys, TINY_ARGS + ["--mode", "loop", "--loop-steps", "8"])
    assert records[2]["impl"] == "igpt step" and records[2]["best_s"] == 1.0


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_profile_finds_every_product_of_the_forward_pass_and_the_train_step(capsys, attention):
    argv = TINY_ARGS + ["--mode", "forward,train", "--profile", "--attention", attention]
    records, table = _records(capsys, argv)
    profiles = {r["of"]: r for r in records if r["mode"] == "profile"}
    assert set(profiles) == {"forward", "train"}
    # From the architecture, not the HLO: per token, the dense layers' d*3d + d*d + 2*d*f
    # multiply-adds and the head's d*V. XLA's attention: scores and values, 2 * d * 16 each
    # over all 16 keys (16 queries make one block, which scores the masked keys too). The
    # kernel: 2 * d per (query, key) pair a query reads (16 * 17 / 2 of them) for each product,
    # 2 forward and 5 backward.
    d, f, v, t, batch = 32, 4 * 32, 512, 16, 2
    dense = batch * t * 2 * (4 * d * d + 2 * d * f + d * v)
    xla_attention = batch * t * 2 * (2 * d * t)
    kernel_product = batch * (t * (t + 1) // 2) * 2 * d
    for of, passes, kernel_products in (("forward", 1, 2), ("train", 3, 7)):
        parts = {p["part"]: p for p in profiles[of]["parts"]}
        assert list(parts) == ["dense products", "attention kernel", "attention products",
                               "attention, other", "the rest"]  # fmt: skip
        assert parts["dense products"]["flops"] == passes * dense
        if attention == "auto":
            assert parts["attention kernel"]["flops"] == kernel_products * kernel_product
            unused = ("attention products", "attention, other")
        else:
            assert parts["attention products"]["flops"] == passes * xla_attention
            assert parts["attention, other"]["flops"] == 0
            unused = ("attention kernel",)
        assert parts["the rest"]["flops"] == 0
        assert all(parts[p]["kernel_s"] == parts[p]["flops"] == 0 for p in unused)
        used = [p for p in parts.values() if p["part"] not in unused]
        assert all(p["kernel_s"] > 0 for p in used)
        assert sum(p["share"] for p in used) == pytest.approx(1, abs=3e-3)
        assert profiles[of]["wall_s"] > 0 and 0 <= profiles[of]["gaps"] < 1
    assert "profile (train, batch 2)" in table


def test_bfloat16_runs_on_both_sides(capsys):
    argv = TINY_ARGS + ["--mode", "train", "--vs-hf", "--dtype", "bfloat16"]
    records, _ = _records(capsys, argv)
    assert {r["dtype"] for r in records[1:] if "dtype" in r} == {"bfloat16"}
    assert records[0]["matmul_dtype"] == "bfloat16"  # fractions are of the bfloat16 peak
    assert all(r["per_s"] > 0 for r in records[1:] if "per_s" in r)


def test_flop_count_matches_the_model_shapes():
    # Each kernel scalar of the model is one multiply-add per token (2 FLOPs); attention adds
    # q.k and p.v over the p + 1 visible positions: 2 * 2 * d per position and layer.
    config = igpt.ModelConfig(n_embd=48, n_layer=3, n_head=4, n_positions=36, n_inner=80)
    shapes = igpt.param_shapes(config)
    kernels = [shapes["lm_head"]["kernel"]] + [
        shapes["h"][block][name]["kernel"]
        for block, name in [
            ("attn", "c_attn"),
            ("attn", "c_proj"),
            ("mlp", "c_fc"),
            ("mlp", "c_proj"),
        ]
    ]
    kernel_scalars = sum(int(np.prod(k.value.shape)) for k in kernels)
    for length in (1, 17, 36):
        attention = sum(4 * 48 * 3 * (p + 1) for p in range(length))
        assert forward_flops(config, length) == 2 * kernel_scalars * length + attention


def test_transformers_twin_has_the_same_weights():
    from benchmarks import hf as benchmark_hf

    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16)
    params = benchmark.benchmark_params(config)
    ids = benchmark.random_ids(config, 2)
    with torch.no_grad():
        theirs = benchmark_hf.hf_model(config, params)(torch.tensor(ids).long()).logits.numpy()
    ours = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids)).logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.std(theirs) > 0.1  # the random head gives informative logits


def test_bad_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--mode", "fly"])
    assert "unknown --mode" in capsys.readouterr().err


def test_size_flags_override_the_preset():
    args = benchmark.parse_args(["--d", "64", "--vocab", "17", "--side", "14", "--heads", "2"])
    config = benchmark.config_from_args(args)
    assert (config.n_embd, config.vocab_size, config.n_positions, config.n_head) == (64, 17, 196, 2)
    assert config.n_layer == igpt.ModelConfig.preset("tiny").n_layer


def test_micro_batches_that_do_not_divide_the_batch_are_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--mode", "train", "--batch", "8", "--micro-batches", "3"])
    assert "--micro-batches=3 must divide --batch=8" in capsys.readouterr().err


def test_micro_batches_give_one_batchs_losses_on_both_sides():
    from benchmarks import hf as benchmark_hf

    config = igpt.ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=16)
    params = benchmark.benchmark_params(config)
    for train_case in (benchmark.igpt_train, benchmark_hf.train_case):
        whole, split = train_case(config, params, 4), train_case(config, params, 4, 2)
        for _ in range(2):  # the loss before and after one update
            assert float(split.run()) == pytest.approx(float(whole.run()), rel=1e-5)


def test_the_train_case_compiles_its_step_once(caplog):
    # The state must start in the step's output shardings, as the trainer's does: a state on
    # the default device made the second call compile again, and that compile counted as a
    # timed call (at S, 12-14 s where the step takes 6.3).
    config = igpt.ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=16)
    case = benchmark.igpt_train(config, benchmark.benchmark_params(config), 4)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for _ in range(3):
            case.run()
    assert sum("Compiling jit(step)" in r.getMessage() for r in caplog.records) == 1
