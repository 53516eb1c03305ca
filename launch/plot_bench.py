"""Plots `launch.bench` results: milliseconds against sequence length, log-log, one panel per bench JSON (mode)
and pass, one line per method.

    python -m launch.plot_bench --inputs=bench_native.json,bench_query_block.json,bench_videonsa.json \\
        --out=bench.png

A file may hold one bench result or a list of them (BENCHMARKS.json: the current figures of each mode). Each series
it draws is printed as one JSON line ({"mode", "pass", "method", "T", "ms"}).
"""

from __future__ import annotations

import json

from absl import app, flags

flags.DEFINE_list("inputs", [], "bench JSON files (`launch.bench --out`, or a list of such results), one panel "
                  "row per result")
flags.DEFINE_string("out", "bench.png", "image to write (any matplotlib format: .png, .svg, .pdf)")
FLAGS = flags.FLAGS

LABELS = {"nsa": "ours (Pallas NSA)", "cudnn": "cuDNN dense causal", "fla": "fla parallel_nsa (64 padded heads)"}


def series(result: dict) -> list[dict]:
    """The (mode, pass, method) series of one bench result, each with its T and ms lists (methods that failed
    at some T are left out there)."""
    mode = result["flags"]["mode"]
    out: dict[tuple[str, str], dict] = {}
    for row in result["rows"]:
        for method in result["flags"]["methods"]:
            ms = row.get(method, {}).get("ms")
            if ms is None:
                continue
            s = out.setdefault((row["pass"], method), {"mode": mode, "pass": row["pass"], "method": method,
                                                       "T": [], "ms": []})
            s["T"].append(row["T"])
            s["ms"].append(ms)
    return list(out.values())


def main(argv) -> None:
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for path in FLAGS.inputs:
        with open(path) as f:
            loaded = json.load(f)
        results += [(path, r) for r in (loaded if isinstance(loaded, list) else [loaded])]
    if not results:
        raise app.UsageError("--inputs: no bench JSON given")
    passes = sorted({row["pass"] for _, r in results for row in r["rows"]}, key=["fwd", "fwd_bwd"].index)
    fig, axes = plt.subplots(len(results), len(passes), figsize=(5.5 * len(passes), 4 * len(results)),
                             squeeze=False)
    for i, (path, result) in enumerate(results):
        for s in series(result):
            ax = axes[i][passes.index(s["pass"])]
            ax.plot(s["T"], s["ms"], marker="o", label=LABELS.get(s["method"], s["method"]))
            print(json.dumps(s), flush=True)
        for j, p in enumerate(passes):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("ms")
            ax.set_title(f"{result['flags']['mode']}, {p.replace('_', '+')} ({result.get('device', '')})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FLAGS.out, dpi=120)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
