"""The test suite, in folders by the part each file tests: kernels (pallas_kernels), model (nsa_jax's model
modules), processor (nsa_jax.processing / chat / tokenizer), data (the pipeline), training (nsa_jax.training and
launch.train), eval (data.tasks and launch.eval), launch (the other entry points and the notebook); references
holds the independent oracles the parity tests share, support the test harness. Test modules import them as
`tests.references.x` / `tests.support.x`: the repository root is on sys.path (pytest's rootdir, or PYTHONPATH in
the subprocesses the tests start)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# Compiling dominates the suite on CPU: XLA's CPU backend at LLVM optimisation level 0 compiles ~40% faster (the
# same HLO runs, only less optimised machine code; no test times anything). Set before any test imports jax, and
# inherited by the subprocesses the tests start.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
