"""Reads a compiled HLO module's text (`compiled.as_text()`, parsed by `nsa_jax.training.profile`): for each while
loop's body, its all-gathers and whether each one feeds the body's compute (a dot or convolution, or a fusion
holding one) in the same iteration. A gather that feeds none only passes its result on to the next iteration:
a scheduler can overlap it with the iteration's compute."""

from __future__ import annotations

import re

from nsa_jax.training.profile import hlo_computations


def while_body_gathers(text: str) -> list[dict]:
    """For each while loop: {"body", "gathers": all-gathers in its body, "free": those that feed no compute
    of the body}."""
    comps = hlo_computations(text)
    has_dot = {c: any(ins.opcode in ("dot", "convolution") for ins in body.values()) for c, body in comps.items()}
    out = []
    for line in text.splitlines():
        m = re.search(r"%while[\w.\-]* = .* while\(.*body=%([\w.\-]+)", line)
        if not m:
            continue
        ins = comps[m.group(1)]
        compute = [n for n, i in ins.items()
                   if i.opcode in ("dot", "convolution") or any(has_dot.get(c) for c in i.calls)]
        feeding, stack = set(), list(compute)  # every instruction some compute depends on
        while stack:
            node = ins.get(stack.pop())
            for operand in node.operands if node else ():
                if operand not in feeding:
                    feeding.add(operand)
                    stack.append(operand)
        gathers = [n for n, i in ins.items() if i.opcode.startswith("all-gather")]
        out.append({"body": m.group(1), "gathers": len(gathers), "free": sum(g not in feeding for g in gathers)})
    return out
