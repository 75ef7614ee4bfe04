"""Plans for clusters without a cluster: compile igpt's sharded programs for a device topology
ahead of time, from abstract inputs only, and report what each needs per chip.

    python -m benchmarks.aot --config=configs/pretrain.py:model=l --topology=v5e:4x4 \
        --config.mesh_shape='(1,16,1)' --config.model.dtype=bfloat16 --config.model.remat=True
    python -m benchmarks.aot --config=configs/digits.py --topology=cpu:8 \
        --config.mesh_shape='(2,4,1)' --programs=train,eval,features,sample

`--topology` names a TPU slice as libtpu does (v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x4, ...;
needs the TPU compiler, `pip install 'igpt[tpu]'`, which runs here on CPU) or `cpu:N`, N
simulated CPU devices. Nothing is allocated: the train state, parameters and batches are
`jax.ShapeDtypeStruct`s carrying the shardings training would give them, and
`jit(...).lower(...).compile()` runs the target's real compiler, whose memory analysis is what
the chip would need (maxtext's train_compile.py and axlearn's run_aot_compilation.py work so).

For each program it prints per-chip argument, output, temporary and total memory against the
chip's HBM; the FLOPs of one call from `igpt.flops` (the compiler's `cost_analysis()` counts a
scanned layer once, not once per layer); the step time and tokens/s per chip that FLOP count
implies at `--mfu` of the chip's peak; and how every parameter is sharded. `--json` writes the
same as one JSON object.
"""

from __future__ import annotations

import sys

from igpt.runtime import compile_ahead_environment

if __name__ == "__main__":
    # Before JAX is imported: the topology decides the platform and the device count.
    compile_ahead_environment(sys.argv)

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from igpt import cli
from igpt.config import ModelConfig
from igpt.features import make_feature_fn
from igpt.flops import PEAK_FLOPS, forward_flops, train_step_flops
from igpt.model import param_shapes
from igpt.sampling import _compiled_sampler
from igpt.sharding import abstract, batch_sharding, make_mesh, param_shardings
from igpt.train.config import build_model_config, rules_from_config
from igpt.train.step import (
    abstract_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

PROGRAMS = ("train", "eval", "features", "sample")

# HBM per chip (bytes) by `device_kind` prefix, from the vendors' data sheets. The compiler
# keeps a little for itself (v5e reports 15.75 GiB available), so a plan within a few percent
# of the figure is marginal.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v5e": 16 * 2**30,
    "TPU v5p": 95 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,  # v6e (Trillium)
}


def topology_devices(topology: str) -> list:
    """The devices of `topology`: "cpu:N" (this process's CPU devices, N of them) or a TPU
    slice name for libtpu ("v5e:4x4")."""
    platform, _, shape = topology.partition(":")
    if platform == "cpu":
        devices = jax.devices("cpu")
        if not shape.isdigit() or int(shape) != len(devices):
            raise cli.UsageError(
                f"--topology={topology}: this process has {len(devices)} CPU devices; write "
                f"cpu:N and run it as `python -m benchmarks.aot` (which sets the count)"
            )
        return devices
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except ImportError as e:  # pragma: no cover - depends on what is installed
        raise cli.UsageError(f"--topology={topology}: {e}") from None
    except Exception as e:
        if "tpu support not installed" in str(e).lower():
            raise cli.UsageError(
                f"--topology={topology}: the TPU compiler is not installed "
                "(pip install 'igpt[tpu]'), or use --topology=cpu:N"
            ) from None
        raise cli.UsageError(f"--topology={topology}: {str(e).splitlines()[0]}") from None


def hbm_bytes(device) -> int | None:
    """HBM of one chip by its kind; None for CPUs (host memory) and unknown kinds."""
    for prefix, size in HBM_BYTES.items():
        if device.device_kind.startswith(prefix):
            return size
    return None


def device_peak(device) -> float | None:
    """Data-sheet bf16 matmul peak of one chip (igpt.flops.PEAK_FLOPS); None for CPUs."""
    for prefix, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return peak
    return None


def _batch(mesh, size: int, tokens: int) -> dict:
    sharding = batch_sharding(mesh)
    return {
        "tokens": jax.ShapeDtypeStruct((size, tokens), jnp.int32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((size,), jnp.bool_, sharding=sharding),
        "index": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding),
    }


def _abstract_params(model_config: ModelConfig, mesh, rules):
    shardings = param_shardings(model_config, mesh, rules)
    return abstract(nn.meta.unbox(param_shapes(model_config)), shardings)


def lower_program(name: str, config, model_config: ModelConfig, mesh, rules):
    """(lowered program, FLOPs of one call, tokens of one call) of program `name`."""
    batch, tokens = config.batch_size, model_config.n_positions
    if name == "train":
        schedule = learning_rate_schedule(config.optimizer, 1, max(config.num_steps, 2))
        tx = make_optimizer(config.optimizer, schedule)
        step = make_train_step(
            model_config, tx, schedule, mesh, grad_accum_steps=config.grad_accum_steps, rules=rules
        )
        state = abstract_train_state(model_config, tx, mesh, rules)
        flops = train_step_flops(model_config, batch)
        return step.lower(state, _batch(mesh, batch, tokens)), flops, batch * tokens
    params = _abstract_params(model_config, mesh, rules)
    if name == "eval":
        step = make_eval_step(model_config, mesh)
        flops = batch * forward_flops(model_config, tokens)
        return step.lower(params, _batch(mesh, batch, tokens)), flops, batch * tokens
    if name == "features":
        layers = tuple(range(model_config.n_layer + 1))
        fn = make_feature_fn(model_config, layers, mesh)
        flops = batch * forward_flops(model_config, tokens)
        return fn.lower(params, _batch(mesh, batch, tokens)), flops, batch * tokens
    if name == "sample":
        if not model_config.causal:
            raise cli.UsageError("--programs=sample: a BERT model has no sampler")
        num = config.sample.num_samples or 1
        run = _compiled_sampler(model_config, num, 0, tokens, False, None, False)
        prompt = jax.ShapeDtypeStruct((num, 0), jnp.int32)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        flops = num * forward_flops(model_config, tokens)
        return run.lower(params, key, prompt, scalar, scalar), flops, num * tokens
    raise cli.UsageError(f"--programs: {name!r} is not one of {', '.join(PROGRAMS)}")


def memory(compiled) -> dict:
    """Per-device bytes of a compiled program: arguments, outputs, temporaries, and the total
    live at once (outputs that reuse donated arguments counted once)."""
    stats = compiled.memory_analysis()
    out = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def parameter_layout(model_config: ModelConfig, mesh, rules) -> list[dict]:
    """Every parameter's global shape, partition spec and per-device shard shape."""
    shardings = param_shardings(model_config, mesh, rules)
    shapes = nn.meta.unbox(param_shapes(model_config))
    rows = []
    for (path, shape), sharding in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings), strict=True
    ):
        rows.append(
            {
                "name": "/".join(str(getattr(k, "key", k)) for k in path),
                "shape": list(shape.shape),
                "spec": [list(a) if isinstance(a, tuple) else a for a in sharding.spec],
                "shard": list(sharding.shard_shape(shape.shape)),
            }
        )
    return rows


def plan(config, topology: str, programs, mfu: float) -> dict:
    """Compile `programs` of the run `config` for `topology` and measure them (see the module
    docstring); the result is JSON-ready."""
    devices = topology_devices(topology)
    mesh = make_mesh(config.mesh_shape, devices)
    rules = rules_from_config(config.sharding_rules)
    model_config = build_model_config(config)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (shards * config.grad_accum_steps):
        raise cli.UsageError(
            f"batch_size={config.batch_size} does not split over data x fsdp = {shards} devices"
            f" x grad_accum_steps={config.grad_accum_steps}"
        )
    chips = len(devices)
    device = devices[0]
    peak, hbm = device_peak(device), hbm_bytes(device)
    layout = parameter_layout(model_config, mesh, rules)
    result = {
        "topology": topology,
        "device_kind": device.device_kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "model": {k: getattr(model_config, k) for k in
                  ("n_embd", "n_layer", "n_head", "n_positions", "dtype", "remat", "objective")},
        "parameters": sum(math.prod(r["shape"]) for r in layout),
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "hbm_per_chip": hbm,
        "peak_flops_per_chip": peak,
        "mfu": mfu,
        "programs": {},
        "layout": layout,
    }  # fmt: skip
    for name in programs:
        lowered, flops, tokens = lower_program(name, config, model_config, mesh, rules)
        entry = {"flops": flops, "tokens": tokens}
        try:
            entry["memory"] = memory(lowered.compile())
            entry["fits"] = None if hbm is None else entry["memory"]["total"] <= hbm
        except jax.errors.JaxRuntimeError as e:
            # The TPU compiler refuses a program that cannot fit in HBM: a plan's answer, not
            # an error ("... memory required for HLO temporaries (77.25G) exceeds ...").
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            entry["memory"], entry["fits"] = None, False
            entry["compiler"] = next(
                (line.strip() for line in str(e).splitlines() if "exceeds" in line),
                str(e).splitlines()[0],
            )
        if peak:
            seconds = flops / chips / (mfu * peak)
            entry["step_seconds"] = seconds
            entry["tokens_per_s_per_chip"] = tokens / chips / seconds
        result["programs"][name] = entry
    return result


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms" if s >= 1e-3 else f"{1e6 * s:.3g} us"


def report(result: dict) -> str:
    """The plan as text: one block per program, then the parameter layout."""
    lines = [
        f"{result['topology']}: {result['chips']} x {result['device_kind']}, mesh "
        + " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
        + f", HBM {_gib(result['hbm_per_chip'])} per chip",
        "model "
        + ", ".join(f"{k}={v}" for k, v in result["model"].items())
        + f"; {result['parameters']:,} parameters; batch {result['batch_size']}"
        + (f" in {result['grad_accum_steps']} micro-batches" if result["grad_accum_steps"] > 1
           else ""),
    ]  # fmt: skip
    for name, entry in result["programs"].items():
        m = entry["memory"]
        if m is None:
            lines.append(f"{name:9s} DOES NOT FIT: {entry['compiler']}")
            continue
        fits = {None: "", True: "  fits", False: "  DOES NOT FIT"}[entry["fits"]]
        lines.append(
            f"{name:9s} per chip: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}"
            f" ({_gib(m['aliased'])} reusing donated arguments), temporaries "
            f"{_gib(m['temporaries'])}, total {_gib(m['total'])}{fits}"
        )
        line = f"{'':9s} {entry['flops'] / 1e12:,.3f} TFLOP per call"
        if "step_seconds" in entry:
            line += (
                f"; at {100 * result['mfu']:.0f}% of {result['peak_flops_per_chip'] / 1e12:.0f}"
                f" TFLOP/s per chip: {1e3 * entry['step_seconds']:,.1f} ms, "
                f"{entry['tokens_per_s_per_chip']:,.0f} tokens/s per chip"
            )
        lines.append(line)
    lines.append("parameters (global shape -> per-device shard, partition spec):")
    for row in result["layout"]:
        spec = ", ".join("-" if a is None else str(a) for a in row["spec"]) or "replicated"
        lines.append(f"  {row['name']:28s} {row['shape']} -> {row['shard']}  ({spec})")
    return "\n".join(lines)


config_flags.DEFINE_config_file("config", None, "config file[:ARG]", lock_config=True)
flags.DEFINE_string("topology", None, "cpu:N or a TPU slice (v5e:4x4)", required=True)
flags.DEFINE_list("programs", ["train", "eval"], f"programs to compile: {', '.join(PROGRAMS)}")
flags.DEFINE_float("mfu", 0.5, "fraction of the chip's peak FLOP/s the step time assumes")
flags.DEFINE_string("json", None, "also write the plan to this JSON file")


def main():
    for name in cli.FLAGS.programs:
        if name not in PROGRAMS:
            raise cli.UsageError(f"--programs: {name!r} is not one of {', '.join(PROGRAMS)}")
    if not 0 < cli.FLAGS.mfu <= 1:
        raise cli.UsageError(f"--mfu={cli.FLAGS.mfu} must be in (0, 1]")
    result = plan(cli.FLAGS.config, cli.FLAGS.topology, cli.FLAGS.programs, cli.FLAGS.mfu)
    print(report(result), flush=True)
    if cli.FLAGS.json:
        Path(cli.FLAGS.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    cli.run(main)
