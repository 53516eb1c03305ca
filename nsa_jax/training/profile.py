"""Where a training step's device time goes: the kernels of a `jax.profiler` trace, each attributed through its
HLO instruction to a part of the model (the name scope it was traced under), a phase (forward, remat recompute,
backward) and a kind of work (matmul, Pallas / Triton kernel, cuDNN attention, collective, other).

The parts are the name scopes the code opens: "vision_tower" (`vision.VisionTower`), "attention_core"
(`head_parallel.head_parallel`: the attention core of every decoder layer, its all-to-alls included), "loss"
(`loss.cross_entropy_sum`: LM head and cross entropy) and "optimizer" (`train_step.StepFunctions.apply`); the
rest of the language model (projections, MLP, norms, embedding) is "language (rest)".
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

PARTS = (("vision_tower", "vision tower"), ("attention_core", "attention core"), ("loss", "loss"),
         ("optimizer", "optimizer"))
REST = "language (rest)"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
# Instructions whose trace events enclose other instructions' events (on CPU the thunks nest).
CONTROL_FLOW = ("while", "conditional", "call", "async-start", "async-done", "async-update")


@dataclasses.dataclass(frozen=True)
class Instruction:
    opcode: str
    target: str  # custom_call_target, or the fusion's kind / backend config hint, else ""
    op_name: str  # metadata op_name: the JAX name stack
    operands: tuple[str, ...] = ()  # the instructions it reads
    calls: tuple[str, ...] = ()  # the computations it calls (a fusion's body, a while's condition and body)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([A-Za-z][\w\-$.]*)\((.*)")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def _balanced(text: str, depth: int) -> int:
    """The index just past the parenthesis that brings `depth` open ones (at text's start) to 0, else len(text)."""
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i + 1
    return len(text)


def parse_instruction(line: str) -> tuple[str, Instruction] | None:
    """(name, Instruction) of one line of HLO text (an instruction, e.g. a trace event's long_name), else None."""
    m = _INSTR.match(line)
    if not m or line.lstrip().startswith(("HloModule", "//")):
        return None
    name, rest = m.groups()
    # Skip the result type: a tuple "(...)" (balanced) or one token.
    rest = rest[_balanced(rest, 0):] if rest.startswith("(") else (rest.split(" ", 1)[1] if " " in rest else "")
    op = _OPCODE.match(rest)
    if not op:
        return None
    opcode, tail = op.groups()
    end = _balanced(tail, 1)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    kind = re.search(r"kind=(k\w+)", rest)
    hint = "gemm" if re.search(r"gemm|cublas|__triton_gemm", rest) else ""
    op_name = re.search(r'op_name="([^"]*)"', rest)
    return name, Instruction(
        opcode, target.group(1) if target else (hint or (kind.group(1) if kind else "")),
        op_name.group(1) if op_name else "", tuple(re.findall(r"%([\w.\-]+)", tail[:end])),
        tuple(re.findall(r"(?:calls|condition|body)=%([\w.\-]+)", tail[end:])))


def hlo_computations(hlo_text: str) -> dict[str, dict[str, Instruction]]:
    """{computation name: {instruction name: Instruction}} of an HLO module's text (`compiled.as_text()`)."""
    comps: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = comps.setdefault(header.group(1), {})
        elif line.startswith("}"):
            current = None
        elif current is not None and (parsed := parse_instruction(line)):
            current[parsed[0]] = parsed[1]
    return comps


def hlo_instructions(hlo_text: str) -> dict[str, Instruction]:
    """{instruction name: Instruction} of every computation of an HLO module's text."""
    return {name: ins for comp in hlo_computations(hlo_text).values() for name, ins in comp.items()}


def classify(name: str, ins: Instruction) -> tuple[str, str, str]:
    """(part, phase, kind) of one instruction."""
    part = next((label for scope, label in PARTS if scope in ins.op_name), REST)
    phase = ("recompute" if "rematted_computation" in ins.op_name else
             "backward" if "transpose(" in ins.op_name else "forward")
    target, lname = ins.target.lower(), name.lower()
    if ins.opcode.startswith(COLLECTIVES):
        kind = "collective"
    elif "fmha" in target or "cudnn$fmha" in target:
        kind = "cuDNN attention"
    elif ins.opcode in ("dot", "convolution") or any(s in target or s in lname for s in ("gemm", "cublas", "matmul")):
        kind = "matmul"
    elif "triton" in target or "mosaic" in target or "pallas_call" in ins.op_name:
        kind = "Pallas / Triton kernel"
    else:
        kind = "other"
    return part, phase, kind


def trace_file(trace_dir: str) -> str:
    """The newest perfetto trace a `jax.profiler.trace(trace_dir, create_perfetto_trace=True)` wrote."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz under it (was the trace written?)")
    return max(files, key=os.path.getmtime)


def kernel_events(trace: dict | list) -> list[tuple[str, str, float, dict]]:
    """(hlo_module, hlo_op, microseconds, event) of the trace's device work: the events of GPU / TPU streams
    where the trace has devices, else (CPU) the host's XLA thunks."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    out = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        if devices:
            # Device kernels sit on the stream lines; the derived "XLA Ops" / "XLA Modules" lines repeat them.
            if e["pid"] not in devices or not thread.get((e["pid"], e["tid"]), "").startswith("Stream"):
                continue
        out.append((args.get("hlo_module", ""), args["hlo_op"].lstrip("%"), float(e.get("dur", 0.0)), e))
    return out


def breakdown(trace: dict | list, hlo_text: str, steps: int, top: int = 15) -> dict:
    """Device milliseconds per step of the module whose text is `hlo_text`, by part, phase, kind and by
    (part, phase, kind) with each such cell's three costliest instructions, plus the `top` costliest overall.
    Kernels of other programs are summed apart."""
    module = re.match(r"HloModule\s+([^\s,]+)", hlo_text)
    module = module.group(1) if module else ""
    instructions = hlo_instructions(hlo_text)
    cells: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    unknown: collections.Counter = collections.Counter()
    unknown_event: dict[str, dict] = {}
    placed: dict[str, Instruction] = {}
    other_programs = 0.0
    kernels = []
    for mod, op, us, event in kernel_events(trace):
        if module and mod and mod != module:
            other_programs += us
            continue
        kernels.append((op, us, event))
        ins = instructions.get(op)
        if ins is None and "long_name" in event["args"]:  # the instruction's own text, where the trace has it
            parsed = parse_instruction(event["args"]["long_name"])
            ins = parsed[1] if parsed else None
        if ins is None:
            unknown[op] += us
            unknown_event.setdefault(op, event)
            continue
        if ins.opcode in CONTROL_FLOW:
            continue
        cells[classify(op, ins)] += us
        ops[op] += us
        placed[op] = ins
    ms = lambda us: round(us / 1e3 / steps, 3)
    total = sum(cells.values())
    idle_us, idle_before = _idle(kernels, {**instructions, **placed})

    def by(i):
        acc: collections.Counter = collections.Counter()
        for key, us in cells.items():
            acc[key[i]] += us
        return {k: ms(v) for k, v in acc.most_common()}

    op_entry = lambda op, us: {"op": op, "kind": classify(op, placed[op])[2], "ms": ms(us),
                               "op_name": placed[op].op_name[-160:]}
    in_cell = collections.defaultdict(list)
    for op, us in ops.most_common():
        in_cell[classify(op, placed[op])].append(op_entry(op, us))

    return {
        "steps": steps, "device_ms_per_step": ms(total), "by_part": by(0), "by_phase": by(1), "by_kind": by(2),
        "cells": [{"part": p, "phase": ph, "kind": k, "ms": ms(us), "top_ops": in_cell[p, ph, k][:3]}
                  for (p, ph, k), us in cells.most_common()],
        "top_ops": [op_entry(op, us) for op, us in ops.most_common(top)],
        "unattributed_ms_per_step": ms(sum(unknown.values())), "other_programs_ms_per_step": ms(other_programs),
        # What the trace called the kernels it could not place (to see how its names differ from the HLO's).
        "unattributed_top": [{"hlo_op": op, "ms": ms(us), "event": {k: unknown_event[op].get(k) for k in
                                                                    ("name", "args")}}
                             for op, us in unknown.most_common(top)],
        # Time no kernel of the module ran, between its first kernel's start and its last one's end (launch gaps
        # between kernels, host syncs, the host between steps), each gap charged to the JAX name stack of the
        # kernel that ended it.
        "idle_ms_per_step": ms(idle_us),
        "idle_before": [{"op_name": name[-160:], "gaps_per_step": round(n / steps, 1), "ms": ms(us)}
                        for name, (us, n) in sorted(idle_before.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def _idle(kernels: list[tuple[str, float, dict]], instructions: dict[str, Instruction]
          ) -> tuple[float, dict[str, tuple[float, int]]]:
    """(microseconds with no kernel running, {op_name of the kernel after a gap: (its gaps' us, their count)})
    over the kernels (op, us, event with "ts") of every stream together; control flow's enclosing events skipped."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + us, op) for op, us, e in kernels
                   if "ts" in e and not (op in instructions and instructions[op].opcode in CONTROL_FLOW))
    total, before = 0.0, collections.defaultdict(lambda: [0.0, 0])
    end = spans[0][1] if spans else 0.0
    for start, stop, op in spans[1:]:
        if start > end:
            name = instructions[op].op_name if op in instructions else op
            total += start - end
            before[name][0] += start - end
            before[name][1] += 1
        end = max(end, stop)
    return total, {k: (v[0], v[1]) for k, v in before.items()}


def load_trace(trace_dir: str) -> dict | list:
    with gzip.open(trace_file(trace_dir), "rt") as f:
        return json.load(f)
