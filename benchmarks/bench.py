"""Throughput benchmark: forward, train step, KV-cache sampling and tokenization, optionally side
by side with transformers' PyTorch ImageGPT (`benchmarks/hf.py`) in the same process, and the
training loop as a whole against its bare step.

    python -m benchmarks --preset tiny --mode sample,train --vs-hf
    python -m benchmarks --preset s --batch 2 --mode train --vs-hf --repeats 2
    python -m benchmarks --d 128 --layers 4 --heads 4 --side 16 --mode sample --vs-hf
    python -m benchmarks --d 128 --layers 4 --heads 4 --side 14 --batch 64 --mode loop
    python -m benchmarks --d 128 --layers 4 --heads 4 --side 14 --batch 64 --vocab 17 \
        --mode train --vs-hf --micro-batches 4
    python -m benchmarks --mode train,sample --vs-hf --dtype bfloat16
    python -m benchmarks --d 128 --layers 4 --heads 4 --side 14 --batch 64 --mode train --profile

The train mode times the trainer's own step (`igpt.train.step.make_train_step`), in
`--micro-batches` accumulated micro-batches on both sides. Every measurement reports tokens/s
(images/s for tokenize) and, for the model modes, the achieved FLOP/s from
`igpt.flops.forward_flops` and its fraction of the matmul peak measured in this run;
sampling also reports the memory-bandwidth limit of this machine (the measured read bandwidth
over the bytes a decode step must read) and its fraction: against the best bandwidth of the
run, and ("% adj.") each call against the bandwidth read just before its round of calls, as a
median. It prints one JSON line per measurement, then a table. `--profile` also splits igpt's
forward pass and train step into where their time goes (`benchmarks/profile.py`).
Compile or first-call time is reported apart from the steady state. When both implementations
run, their timed calls alternate, so a change in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profile import profile
from igpt import data as data_lib
from igpt.config import ModelConfig
from igpt.flops import forward_flops, measure_matmul_peak
from igpt.model import ImageGPT, count_params, init_cache, init_params, param_shapes
from igpt.sampling import sample
from igpt.sharding import global_batch, make_mesh
from igpt.tokenizer import ColorTokenizer
from igpt.train.config import pretrain_defaults
from igpt.train.step import (
    TrainState,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    state_shardings,
)

LEARNING_RATE = 1e-4
BETAS = (0.9, 0.95)  # the paper's Adam betas


@dataclasses.dataclass
class Case:
    """One thing to time: `run()` does one blocking call of `work` units (tokens or images)
    worth `flops` FLOPs; `hlo()`, where given, is the optimized HLO text of what it runs."""

    impl: str  # "igpt" or "transformers"
    run: Callable[[], object]
    work: int
    flops: int = 0
    hlo: Callable[[], str] | None = None


def measure_bandwidth(mbytes: int = 256, repeats: int = 20) -> float:
    """Best bytes/s of a jitted sum over a float32 array of `mbytes` MiB (a read-only stream,
    the roofline of batch-1 sampling, which reads every weight once per token). On a shared
    virtual machine it varies by a third within minutes, hence the many repeats."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(repeats))
    return x.nbytes / best


def sample_bytes_per_step(config: ModelConfig, batch: int, tokens: int) -> float:
    """Bytes one decode step of `batch` sequences must read at least, on average over samples
    of `tokens` tokens: every weight once, in the compute dtype (of the embedding tables only
    one row each), and each sequence's keys and values of the positions before it, in the
    cache's dtype (float32 on CPUs whatever the compute dtype)."""
    shapes = {k: v for k, v in param_shapes(config).items() if k not in ("wte", "wpe")}
    cache = 2 * config.n_layer * config.n_embd * (tokens + 1) / 2
    (cached, *_) = jax.tree.leaves(jax.eval_shape(lambda: init_cache(config, 1, tokens)))
    weights = jnp.dtype(config.compute_dtype).itemsize * count_params(shapes)
    return weights + cached.dtype.itemsize * batch * cache


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def benchmark_params(config: ModelConfig, seed: int = 0) -> dict:
    """igpt's initialisation with a random (not zero) logit head, so sampling sees a peaked,
    non-uniform distribution as a trained model would."""
    params = init_params(config, jax.random.key(seed))
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = jax.random.normal(jax.random.key(seed + 1), head.shape) * 0.5
    return params


def random_ids(config: ModelConfig, batch: int, seed: int = 0) -> np.ndarray:
    """(batch, n_positions) ids starting with SOS, as a training batch."""
    ids = np.random.default_rng(seed).integers(0, config.palette_size, (batch, config.n_positions))
    ids[:, 0] = config.sos_id
    return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# igpt cases


def igpt_forward(config: ModelConfig, params: dict, batch: int) -> Case:
    """Jitted forward pass to logits over a full-length batch."""
    model = ImageGPT(config)
    ids = jnp.asarray(random_ids(config, batch))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    return Case(
        "igpt",
        lambda: forward(params, ids).block_until_ready(),
        batch * config.n_positions,
        batch * forward_flops(config, config.n_positions),
        hlo=lambda: forward.lower(params, ids).compile().as_text(),
    )


def igpt_train(config: ModelConfig, params: dict, batch: int, micro_batches: int = 1) -> Case:
    """The trainer's own step (`igpt.train.step.make_train_step`, as `scripts/train.py` runs
    it): loss and gradient over `micro_batches` accumulated micro-batches, then an AdamW update
    at a constant rate; the state is donated."""
    opt = pretrain_defaults().optimizer
    opt.update(learning_rate=LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], schedule="constant")
    schedule = learning_rate_schedule(opt, 0, 1)
    tx = make_optimizer(opt, schedule)
    mesh = make_mesh((1, 1, 1))
    step = make_train_step(config, tx, schedule, mesh, grad_accum_steps=micro_batches)
    own = jax.tree.map(jnp.copy, params)  # donated buffers must not be the caller's
    key = jax.random.key_data(jax.random.key(0))
    # Placed in the step's own output shardings, as the trainer's state is: a state on the
    # default device would be a different input, and the second call would compile again.
    shardings = state_shardings(config, tx, mesh)
    state = [
        jax.device_put(TrainState(jnp.zeros((), jnp.int32), own, tx.init(own), key), shardings)
    ]
    tokens = np.random.default_rng(0).integers(0, config.palette_size, (batch, config.n_positions))
    labels = np.zeros(batch, np.int32)
    data = global_batch(
        {"tokens": tokens.astype(np.int32), "label": labels, "mask": np.ones(batch, bool)}, mesh
    )

    def run():
        state[0], metrics = step(state[0], data)
        return metrics["loss"].block_until_ready()

    def hlo():
        return step.lower(state[0], data).compile().as_text()

    flops = 3 * batch * forward_flops(config, config.n_positions)
    return Case("igpt", run, batch * config.n_positions, flops, hlo)


def igpt_sample(config: ModelConfig, params: dict, batch: int, tokens: int, top_k: int) -> Case:
    """`igpt.sampling.sample` of `tokens` tokens from SOS, new key each call."""
    calls = iter(range(1 << 30))

    def run():
        key = jax.random.key(next(calls))
        # numpy ids: the call returns only when they are on the host
        return sample(config, params, key, num_samples=batch, top_k=top_k, length=tokens)

    return Case("igpt", run, batch * tokens, batch * forward_flops(config, tokens))


def igpt_tokenize(palette: np.ndarray, images: np.ndarray) -> Case:
    """`ColorTokenizer.encode` of a uint8 batch; building its colour table is warm-up."""
    tokenizer = ColorTokenizer(palette, size=images.shape[1:3])
    return Case("igpt", lambda: tokenizer.encode(images), len(images))


def loop_records(
    config: ModelConfig, batch: int, steps: int, workdir: str, micro_batches: int = 1
) -> list[dict]:
    """igpt's training loop as `scripts/train.py` runs it (`igpt.train.loop.train`: the data
    pipeline on the embedded digits resized to the model's side, metrics every quarter of the
    run, checkpoints every quarter) against its own compiled step alone, on one batch already
    on the device, in quarters as long. Each figure is its best quarter (the loop's first,
    which holds the compilation, left out): on a shared machine the time of a quarter varies
    by 10-20% with other tenants' load, more than the loop's overhead being measured."""
    import ml_collections

    from igpt.sharding import global_batch
    from igpt.train import loop
    from igpt.train.config import pretrain_defaults
    from igpt.train.metrics import METRICS_FILE
    from igpt.train.step import make_train_step

    cfg = pretrain_defaults()
    fields = config.to_dict() | {"n_inner": config.mlp_dim}
    cfg.model = ml_collections.ConfigDict(fields)
    palette = os.path.join(workdir, "palette.npy")
    rng = np.random.default_rng(0)
    np.save(palette, rng.uniform(-1, 1, (config.palette_size, 3)).astype(np.float32))
    cfg.data.update(train="digits:train", val="", image_size=config.image_side, palette=palette)
    quarter = max(steps // 4, 1)
    cfg.update(batch_size=batch, grad_accum_steps=micro_batches)
    cfg.update(num_steps=4 * quarter, log_every=quarter)
    cfg.update(checkpoint_every=quarter, keep_checkpoints=1)
    with loop.setup(cfg, os.path.join(workdir, "run")) as run:
        loop.train(run)
        lines = (run.workdir / METRICS_FILE).read_text().splitlines()
        logged = [json.loads(line) for line in lines]
        loop_s = min(quarter * batch * config.n_positions / r["tokens_per_s"] for r in logged[1:])
        step = make_train_step(
            run.model_config,
            run.tx,
            run.schedule,
            run.mesh,
            grad_accum_steps=micro_batches,
            rules=run.rules,
        )
        iterator = data_lib.make_train_iterator(
            run.train_source, run.tokenizer, global_batch_size=batch,
            image_size=config.image_side, seed=0,
        )  # fmt: skip
        fixed = global_batch(next(iterator), run.mesh)
        state = [loop.initial_state(run)]

        def bare():
            for _ in range(quarter):
                state[0], metrics = step(state[0], fixed)
            jax.block_until_ready(metrics)

        bare()  # compiles
        bare_s = min(_timed(bare) for _ in range(3))
    tokens = quarter * batch * config.n_positions
    flops = quarter * 3 * batch * forward_flops(config, config.n_positions)
    return [
        dict(impl="igpt loop", per_s=_sig(tokens / loop_s), best_s=_sig(loop_s), flops=flops),
        dict(impl="igpt step", per_s=_sig(tokens / bare_s), best_s=_sig(bare_s), flops=flops),
    ]


# ---------------------------------------------------------------------------------------------
# Running and reporting


def time_cases(
    cases: list[Case], repeats: int, before_round: Callable[[], None] | None = None
) -> list[dict]:
    """Warm each case up once (timed apart), then time `repeats` calls of each, alternating
    between cases; `before_round`, if given, runs before each round of calls. The steady-state
    figure is the fastest call: on a shared machine the others include time taken by other
    processes (the median, and every call's time in `times_s`, are recorded too)."""
    warmup = [_timed(case.run) for case in cases]
    times = [[] for _ in cases]
    for _ in range(repeats):
        if before_round is not None:
            before_round()
        for case, record in zip(cases, times, strict=True):
            record.append(_timed(case.run))
    results = []
    for case, first, record in zip(cases, warmup, times, strict=True):
        best = min(record)
        results.append(
            dict(
                impl=case.impl,
                warmup_s=_sig(first),
                best_s=_sig(best),
                median_s=_sig(statistics.median(record)),
                times_s=[_sig(t) for t in record],
                per_s=_sig(case.work / best),
                flops=case.flops or None,
                flops_per_s=round(case.flops / best) if case.flops else None,
                # Other processes on a small machine distort timings (torch's thread pool
                # stalls when a core is taken); the load after each case shows it.
                loadavg_1min=round(os.getloadavg()[0], 2),
            )
        )
    return results


def _sig(x: float) -> float:
    """x to 6 significant digits (for the JSON records)."""
    return float(f"{x:.6g}")


def machine_info(threads: int, dtype: str) -> dict:
    """The measured roofs of this run (the matmul peak of `dtype` products) and what else was
    loading the machine."""
    peak = measure_matmul_peak(dtype=jnp.dtype(dtype))
    bandwidth = measure_bandwidth()
    return dict(
        mode="machine",
        device=str(jax.devices()[0].device_kind),
        cpus=os.cpu_count(),
        threads=threads,
        matmul_dtype=dtype,
        matmul_peak_gflops=round(peak / 1e9, 1),
        read_bandwidth_gbs=round(bandwidth / 1e9, 1),
        loadavg_1min=round(os.getloadavg()[0], 2),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        default="forward,train,sample,tokenize",
        help="comma-separated: forward, train, sample, tokenize, loop",
    )
    parser.add_argument("--preset", default="tiny", help="ModelConfig preset (default tiny)")
    parser.add_argument("--d", type=int, help="override n_embd")
    parser.add_argument("--layers", type=int, help="override n_layer")
    parser.add_argument("--heads", type=int, help="override n_head")
    parser.add_argument("--side", type=int, help="override the image side (n_positions=side^2)")
    parser.add_argument(
        "--vocab", type=int, help="override vocab_size (colours + SOS: Fashion-MNIST's is 17)"
    )
    parser.add_argument("--batch", type=int, default=8, help="forward/train/loop batch")
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="train, loop: accumulate the gradient over this many micro-batches (both sides)",
    )
    parser.add_argument(
        "--sample-batch", default="1,4,16", help="comma-separated sample batches (1,4,16)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of both implementations (float32 parameters; torch autocast)",
    )
    parser.add_argument("--loop-steps", type=int, default=200, help="steps of the loop mode")
    parser.add_argument(
        "--scan-unroll", type=int, default=0, help="igpt's model.scan_unroll (0: automatic)"
    )
    parser.add_argument(
        "--query-block", type=int, default=0, help="igpt's model.query_block (0: automatic)"
    )
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "dot_product"],
        help="igpt's model.attention (auto: the fused CPU kernel on CPUs)",
    )
    parser.add_argument("--sample-tokens", type=int, help="tokens per sample (default: all)")
    parser.add_argument("--top-k", type=int, default=64, help="top-k of both samplers")
    parser.add_argument("--images", type=int, default=512, help="images per tokenize call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case")
    parser.add_argument("--vs-hf", action="store_true", help="also run transformers (PyTorch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also split igpt's forward and train time by part (CPU only)",
    )
    parser.add_argument("--json", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"forward", "train", "sample", "tokenize", "loop"})
    if unknown:
        parser.error(
            f"unknown --mode {unknown}; choose from forward, train, sample, tokenize, loop"
        )
    args.modes = modes
    if args.micro_batches < 1 or args.batch % args.micro_batches:
        parser.error(f"--micro-batches={args.micro_batches} must divide --batch={args.batch}")
    try:
        args.sample_batches = sorted({int(b) for b in args.sample_batch.split(",")})
    except ValueError:
        parser.error(f"--sample-batch={args.sample_batch!r}: give batches like 1,4,16")
    return args


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The preset with any explicit size overrides."""
    overrides = dict(
        dtype=args.dtype,
        scan_unroll=args.scan_unroll,
        query_block=args.query_block,
        attention=args.attention,
    )
    fields = (("d", "n_embd"), ("layers", "n_layer"), ("heads", "n_head"), ("vocab", "vocab_size"))
    for flag, field in fields:
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if args.side is not None:
        overrides["n_positions"] = args.side * args.side
    return ModelConfig.preset(args.preset, **overrides)


def run(args: argparse.Namespace, emit: Callable[[dict], None]) -> list[dict]:
    """Run the requested modes; `emit` receives each record as it is measured."""
    config = config_from_args(args)
    if args.vs_hf:
        from benchmarks import hf  # imports torch; only when asked

        hf.set_threads(args.threads)
    shape = dict(
        d=config.n_embd,
        layers=config.n_layer,
        heads=config.n_head,
        side=config.image_side,
        vocab=config.vocab_size,
        params=count_params(param_shapes(config)),
    )
    records = [machine_info(args.threads, args.dtype)]
    emit(records[0])
    peak = records[0]["matmul_peak_gflops"] * 1e9
    params = benchmark_params(config)
    tokens = args.sample_tokens or config.n_positions
    palette = np.random.default_rng(0).uniform(-1, 1, (config.palette_size, 3)).astype(np.float32)
    pixels = np.random.default_rng(1).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)

    plans = []  # (mode, batch, [igpt case, maybe transformers case])
    for mode in args.modes:
        if mode == "forward":
            cases = [igpt_forward(config, params, args.batch)]
            if args.vs_hf:
                cases.append(hf.forward_case(config, params, args.batch))
            plans.append((mode, args.batch, cases))
        elif mode == "train":
            cases = [igpt_train(config, params, args.batch, args.micro_batches)]
            if args.vs_hf:
                cases.append(hf.train_case(config, params, args.batch, args.micro_batches))
            plans.append((mode, args.batch, cases))
        elif mode == "sample":
            for batch in args.sample_batches:
                cases = [igpt_sample(config, params, batch, tokens, args.top_k)]
                if args.vs_hf:
                    cases.append(hf.sample_case(config, params, batch, tokens, args.top_k))
                plans.append((mode, batch, cases))
        elif mode == "loop":
            plans.append((mode, args.batch, []))
        else:
            cases = [igpt_tokenize(palette, pixels)]
            if args.vs_hf:
                cases.append(hf.tokenize_case(palette, pixels))
            plans.append((mode, len(pixels), cases))

    bandwidth = records[0]["read_bandwidth_gbs"] * 1e9
    for mode, batch, cases in plans:
        if mode == "loop":
            with tempfile.TemporaryDirectory() as workdir:
                results = loop_records(config, batch, args.loop_steps, workdir, args.micro_batches)
        elif mode == "sample":
            # The read bandwidth just before each round of calls, for a limit measured in the
            # same conditions as the calls after it.
            readings = []

            def read_bandwidth(into=readings):
                into.append(measure_bandwidth())

            results = time_cases(cases, args.repeats, read_bandwidth)
            # The limit: the best bandwidth of this run up to these calls.
            readings.append(measure_bandwidth())
            bandwidth = max(bandwidth, round(max(readings) / 1e9, 1) * 1e9)
        else:
            results = time_cases(cases, args.repeats)
        for result in results:
            record = dict(mode=mode, batch=batch, **shape, dtype=args.dtype, **result)
            if mode in ("train", "loop"):
                record["micro_batches"] = args.micro_batches
            if record["flops"] and "flops_per_s" not in record:
                record["flops_per_s"] = round(record["flops"] / record["best_s"])
            if mode == "sample":
                record["read_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
                record["tokens"] = tokens
                step_bytes = sample_bytes_per_step(config, batch, tokens)
                record["bytes_per_step"] = round(step_bytes)
                record["limit_per_s"] = _sig(batch * bandwidth / step_bytes)
                record["fraction_of_limit"] = round(record["per_s"] / record["limit_per_s"], 3)
                # Each call against the bandwidth read just before its round: on these shared
                # machines the best reading of a run can come from a minute in which the
                # memory was far less busy than during any call.
                record["fraction_of_adjacent_limit"] = round(
                    statistics.median(
                        tokens * step_bytes / t / reading
                        for t, reading in zip(record["times_s"], readings[:-1], strict=True)
                    ),
                    3,
                )
            if record["flops_per_s"]:
                record["fraction_of_peak"] = round(record["flops_per_s"] / peak, 3)
            records.append(record)
            emit(record)
        if len(results) == 2:
            ratio = dict(
                mode=mode,
                batch=batch,
                impl="loop/step" if mode == "loop" else "igpt/transformers",
                ratio=_sig(results[0]["per_s"] / results[1]["per_s"]),
            )
            records.append(ratio)
            emit(ratio)
        if args.profile and mode in ("forward", "train"):
            record = dict(mode="profile", of=mode, batch=batch, **shape, dtype=args.dtype)
            record.update(profile(cases[0].run, cases[0].hlo()))
            records.append(record)
            emit(record)
    return records


def format_table(records: list[dict]) -> str:
    """A readable summary of the records of one run."""
    machine = records[0]
    lines = [
        f"machine: {machine['cpus']} CPUs ({machine['device']}), {machine['matmul_dtype']} "
        f"matmul peak {machine['matmul_peak_gflops']} GFLOP/s, read bandwidth "
        f"{machine['read_bandwidth_gbs']}"
        f" GB/s, load average {machine['loadavg_1min']}",
        f"{'mode':9} {'batch':>5} {'impl':18} {'per s':>12} {'GFLOP/s':>8} {'% peak':>7} "
        f"{'best s':>8} {'warm-up s':>9} {'ratio':>6} {'limit/s':>9} {'% limit':>7} {'% adj.':>7}",
    ]
    # A train or loop batch in micro-batches shows as batch/micro-batches (64/4).
    micro = next((r["micro_batches"] for r in records if r.get("micro_batches", 1) > 1), 1)
    split = ("train", "loop") if micro > 1 else ()
    for r in records[1:]:
        if r["mode"] == "profile":
            lines.append(_profile_line(r))
            continue
        batch = f"{r['batch']}/{micro}" if r["mode"] in split else r["batch"]
        if "ratio" in r:
            ratio = f"{r['ratio']:.2f}"
            lines.append(f"{r['mode']:9} {batch:>5} {r['impl']:18} {'':>47} {ratio:>6}")
            continue
        unit = "img" if r["mode"] == "tokenize" else "tok"
        gflops = f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-"
        peak = f"{100 * r['fraction_of_peak']:.1f}" if "fraction_of_peak" in r else "-"
        warmup = f"{r['warmup_s']:>9.2f}" if "warmup_s" in r else f"{'-':>9}"
        limit = ""
        if "limit_per_s" in r:
            limit = (
                f" {'':>6} {r['limit_per_s']:>9.1f} {100 * r['fraction_of_limit']:>7.1f}"
                f" {100 * r['fraction_of_adjacent_limit']:>7.1f}"
            )
        lines.append(
            f"{r['mode']:9} {batch:>5} {r['impl']:18} {r['per_s']:>8.1f} {unit}"
            f" {gflops:>8} {peak:>7} {r['best_s']:>8.3f} {warmup}{limit}"
        )
    return "\n".join(lines)


def _profile_line(r: dict) -> str:
    """'profile (train, batch 8): wall 0.152 s, overlap 1.28, gaps 2%; kernel ms: dense
    products 68.3 (35%, 153 GFLOP/s), ...'"""
    parts = []
    for p in r["parts"]:
        if not p["kernel_s"]:  # the attention parts a program does not use
            continue
        rate = f", {p['flops_per_s'] / 1e9:.0f} GFLOP/s" if p["flops"] else ""
        parts.append(f"{p['part']} {1e3 * p['kernel_s']:.1f} ({100 * p['share']:.0f}%{rate})")
    return (
        f"profile ({r['of']}, batch {r['batch']}): wall {r['wall_s']:.3f} s, overlap "
        f"{r['overlap']:.2f}, gaps {100 * r['gaps']:.0f}%; kernel ms: " + ", ".join(parts)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.json, "a") if args.json else contextlib.nullcontext() as sink:

        def emit(record):
            line = json.dumps(record)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()

        try:
            records = run(args, emit)
        except ValueError as e:
            print(f"benchmark: error: {e}", file=sys.stderr)
            return 2
    print()
    print(format_table(records))
    return 0
