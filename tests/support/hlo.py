"""Reads a compiled HLO module's text (`compiled.as_text()`): for each while loop's body, its all-gathers and
whether each one feeds the body's compute (a dot or convolution, or a fusion holding one) in the same iteration.
A gather that feeds none only passes its result on to the next iteration: a scheduler can overlap it with the
iteration's compute."""

from __future__ import annotations

import re


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current:
            comps[current].append(line)
    return comps


def _instructions(lines: list[str]) -> dict[str, tuple[str, list[str], list[str]]]:
    """{name: (opcode, operand names, called computations)}."""
    out = {}
    for line in lines:
        m = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$", line)
        if not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):  # a tuple result type: skip its balanced parentheses
            depth = 0
            for i, ch in enumerate(rest):
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    break
            rest = rest[i + 1:]
        else:
            rest = rest.split(" ", 1)[1]
        op = re.match(r"\s*([\w\-]+)\((.*)", rest)
        if not op:
            continue
        opcode, tail = op.groups()
        depth = 1
        for i, ch in enumerate(tail):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        out[name] = (opcode, re.findall(r"%([\w.\-]+)", tail[:i]), re.findall(r"calls=%([\w.\-]+)", tail[i:]))
    return out


def while_body_gathers(text: str) -> list[dict]:
    """For each while loop: {"body", "gathers": all-gathers in its body, "free": those that feed no compute
    of the body}."""
    comps = _computations(text)
    has_dot = {c: any(re.search(r"\s(dot|convolution)\(", line) for line in lines) for c, lines in comps.items()}
    out = []
    for line in text.splitlines():
        m = re.search(r"%while[\w.\-]* = .* while\(.*body=%([\w.\-]+)", line)
        if not m:
            continue
        ins = _instructions(comps[m.group(1)])
        compute = [n for n, (op, _, calls) in ins.items()
                   if op in ("dot", "convolution") or any(has_dot.get(c) for c in calls)]
        feeding, stack = set(), list(compute)  # every instruction some compute depends on
        while stack:
            for operand in ins.get(stack.pop(), ("", [], []))[1]:
                if operand not in feeding:
                    feeding.add(operand)
                    stack.append(operand)
        gathers = [n for n, (op, _, _) in ins.items() if op.startswith("all-gather")]
        out.append({"body": m.group(1), "gathers": len(gathers), "free": sum(g not in feeding for g in gathers)})
    return out
