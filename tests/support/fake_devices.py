"""Runs a test module's `__main__` in a subprocess with N fake CPU devices (XLA_FLAGS must be set before jax
is imported) and returns the JSON it writes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests import ROOT


def run_with_fake_devices(module_file: str, devices: int, out: pathlib.Path, *args: str) -> dict:
    """`python module_file out *args` with `devices` CPU devices, the repository root on PYTHONPATH."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(module_file), str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
