"""Where a compiled program's time goes on CPUs, in five parts: the dense products (qkv,
output projection, MLP, logit head), igpt's fused CPU attention kernel (where the program
uses it), XLA's attention: its products (scores and values) and its other operations
(masking, softmax, the copies and transposes around its products), and the rest (norms,
activations, loss, optimizer).

XLA:CPU runs a compiled program as a graph of thunks, one per fused kernel or library call,
and names each thunk's profiler event after its HLO instruction. So a `jax.profiler` trace
read back with `jax.profiler.ProfileData`, joined to the program's optimized HLO text, gives
each kernel's time, its FLOPs (from the dot shapes) and the model code it came from (the
instruction's `op_name`, which holds the Flax module path).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
import time
from collections.abc import Callable

import jax
from jax.profiler import ProfileData

PARTS = ("dense products", "attention kernel", "attention products", "attention, other", "the rest")

# igpt's fused attention (igpt/attention_kernel.py): its custom-call targets, and the products
# each computes over every (query, key) pair a query reads: the forward pass scores and
# values; the backward pass scores again, the probabilities' gradient, and the queries',
# keys' and values' gradients.
_KERNEL_PRODUCTS = {"igpt_attention_forward": 2, "igpt_attention_backward": 5}

# Instructions whose thunks contain other thunks: their events would count those twice.
_CONTAINERS = {"while", "conditional", "call"}

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    dims: tuple[int, ...]  # of an array result; () for tuples and scalars
    operands: tuple[str, ...]
    attributes: str  # the text after the operand list (dims, calls=, metadata)

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.attributes)
        return found.group(1) if found else ""

    @property
    def called(self) -> list[str]:
        return re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", self.attributes)


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
    """The instructions of an optimized HLO module's text (`compiled.as_text()`) by name
    (names are unique in a module), and the instruction names of each computation.

    The text, because jaxlib's HloModule bindings give no shapes, metadata or called
    computations, and the HLO proto's schema does not ship with jaxlib."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        if head := _COMPUTATION.match(line):
            current = computations.setdefault(head.group(1), [])
            continue
        found = _INSTRUCTION.match(line)
        if not found or current is None:
            continue
        name, rest = found.groups()
        shape, rest = _split_shape(rest)
        opcode, _, rest = rest.partition("(")
        args, attributes = _split_args(rest)
        dims = re.match(r"\w+\[([\d,]*)\]", shape)
        instructions[name] = Instruction(
            opcode=opcode.strip(),
            dims=tuple(int(d) for d in dims.group(1).split(",") if d) if dims else (),
            operands=tuple(re.findall(r"%([\w.\-]+)", args)),
            attributes=attributes,
        )
        current.append(name)
    return instructions, computations


def _split_shape(text: str) -> tuple[str, str]:
    """'f32[2,3]{1,0} dot(...' -> ('f32[2,3]{1,0}', 'dot(...'); tuple shapes nest parentheses."""
    if not text.startswith("("):
        shape, _, rest = text.partition(" ")
        return shape, rest
    end = _closing(text, 0)
    return text[: end + 1], text[end + 2 :]


def _split_args(text: str) -> tuple[str, str]:
    """'a, b), attrs' -> ('a, b', ', attrs'): the operand list up to its closing parenthesis."""
    end = _closing("(" + text, 0) - 1
    return text[:end], text[end + 1 :]


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text) - 1


def product_flops(name: str, instructions: dict, computations: dict) -> int:
    """FLOPs of the dots an instruction computes, itself or in the computations it calls
    (a fusion's): 2 x the result's size x the contracted size."""
    inst = instructions[name]
    if inst.opcode == "dot":
        lhs = instructions[inst.operands[0]].dims
        found = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
        axes = [int(a) for a in found.group(1).split(",") if a] if found else []
        return 2 * math.prod(inst.dims) * math.prod(lhs[a] for a in axes)
    if inst.opcode in _CONTAINERS:
        return 0
    return sum(
        product_flops(inner, instructions, computations)
        for called in inst.called
        for inner in computations.get(called, ())
    )


def kernel_flops(inst: Instruction) -> int | None:
    """FLOPs of a call of igpt's attention kernel, from its (B, T, 3, H, K) operand and its
    causal attribute; None for any other instruction."""
    target = re.search(r'custom_call_target="([^"]*)"', inst.attributes)
    if inst.opcode != "custom-call" or not target or target.group(1) not in _KERNEL_PRODUCTS:
        return None
    found = re.search(r"operand_layout_constraints=\{f32\[([\d,]*)\]", inst.attributes)
    b, t, _, h, k = (int(d) for d in found.group(1).split(","))
    pairs = t * (t + 1) // 2 if re.search(r"causal = 1\b", inst.attributes) else t * t
    return _KERNEL_PRODUCTS[target.group(1)] * b * h * pairs * 2 * k


def part_of(op_name: str, flops: int) -> str:
    """The part of the model an instruction belongs to, from its op_name: igpt's XLA
    attention runs inside the `Attention._attend` methods (`attn._attend`,
    `attn._attend_with_cache`)."""
    attention = "attn._attend" in op_name
    if flops:
        return "attention products" if attention else "dense products"
    return "attention, other" if attention else "the rest"


def kernel_events(run: Callable[[], object], calls: int) -> tuple[list, list[float]]:
    """(name, start ns, end ns) of every profiler event on XLA's threads during `calls` calls
    of `run` (already compiled), and the wall seconds of each call."""
    with tempfile.TemporaryDirectory() as trace_dir:
        walls = []
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                tic = time.perf_counter()
                run()
                walls.append(time.perf_counter() - tic)
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
    events = [
        (event.name, event.start_ns, event.end_ns)
        for plane in data.planes
        for line in plane.lines
        if line.name.startswith("tf_XLA")  # XLA:CPU's executor and intra-op threads
        for event in line.events
    ]
    return events, walls


def _covered_ns(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def profile(run: Callable[[], object], hlo_text: str, calls: int = 3) -> dict:
    """The five parts' kernel time per call of `run`, a compiled program whose optimized HLO
    is `hlo_text`, with the FLOP/s of their products; the wall time of a call; `overlap`, the
    kernel time over the wall time (above 1 where independent kernels ran at once); and
    `gaps`, the fraction of the wall time in which no kernel ran (the executor's own work).

    A kernel's time runs from its start to its end: one that splits itself over several
    threads (the dense products do) counts once. CPU only: elsewhere the profiler's events
    are device kernels, not thunks.
    """
    if jax.default_backend() != "cpu":
        backend = jax.default_backend()
        raise ValueError(f"--profile reads XLA:CPU's kernels; this run is on {backend}")
    instructions, computations = parse_hlo(hlo_text)
    events, walls = kernel_events(run, calls)
    parts = {part: dict(part=part, kernel_s=0.0, flops=0) for part in PARTS}
    intervals = []
    for name, start, end in events:
        inst = instructions.get(name)
        if inst is None or inst.opcode in _CONTAINERS:  # executor events, async ends, loops
            continue
        flops = kernel_flops(inst)
        if flops is None:
            flops = product_flops(name, instructions, computations)
            part = parts[part_of(inst.op_name, flops)]
        else:
            part = parts["attention kernel"]
        part["kernel_s"] += (end - start) / 1e9 / calls
        part["flops"] += flops / calls
        intervals.append((start, end))
    total = sum(p["kernel_s"] for p in parts.values())
    for p in parts.values():
        p["share"] = round(p["kernel_s"] / total, 3) if total else 0.0
        p["flops_per_s"] = round(p["flops"] / p["kernel_s"]) if p["flops"] else None
        p["kernel_s"], p["flops"] = float(f"{p['kernel_s']:.6g}"), round(p["flops"])
    return dict(
        wall_s=float(f"{min(walls):.6g}"),
        overlap=round(total * calls / sum(walls), 3),
        gaps=round(1 - _covered_ns(intervals) / 1e9 / sum(walls), 3),
        parts=list(parts.values()),
    )
