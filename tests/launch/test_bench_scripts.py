"""The two benchmark scripts run end to end on CPU (tiny shapes) and report self-consistent figures; the
figures that matter are measured on the device (BENCHMARKS.md), never asserted here."""

import json
import subprocess
import sys


def _run(args, tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-m", *args, f"--out={out}"], check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def test_bench_train_reports_consistent_mfu_and_profile(tmp_path):
    r = _run(["launch.bench_train", "--config=configs/tiny.py", "--config.peak_flops_per_device=1e11",
              "--steps=2", "--warmup=0", f"--profile_dir={tmp_path / 'trace'}", "--profile_steps=1"], tmp_path)
    assert r["step_s"] > 0 and r["compile_s"] > 0 and r["tokens_per_step"] > r["vision_tokens"] > 0
    assert abs(r["tokens_per_s"] * r["step_s"] - r["tokens_per_step"]) < 1e-6 * r["tokens_per_step"]
    assert abs(r["mfu"] - r["model_tflops_per_step"] * 1e12 / r["step_s"] / 1e11) < 1e-9
    assert r["last_loss"] < r["first_loss"]  # after two AdamW updates on one fixed batch
    # The traced step's kernels are attributed to every part of the model through their name scopes.
    prof = r["profile"]
    assert set(prof["by_part"]) == {"vision tower", "attention core", "language (rest)", "loss", "optimizer"}
    assert all(ms > 0 for ms in prof["by_part"].values()) and prof["unattributed_ms_per_step"] == 0
    assert abs(sum(prof["by_part"].values()) - prof["device_ms_per_step"]) < 0.01
    assert 0 <= prof["idle_ms_per_step"] < r["step_s"] * 1e3 and len(prof["idle_before"]) <= 15
    # The compiled program is kept beside the trace: re-reading both gives the same breakdown.
    from nsa_jax.training import profile

    hlo = (tmp_path / "trace" / "step.hlo.txt").read_text()
    assert profile.breakdown(profile.load_trace(str(tmp_path / "trace")), hlo, 1)["by_part"] == prof["by_part"]


def test_bench_query_block_mode_and_breakdown(tmp_path):
    r = _run(["launch.bench", "--seq_lens=96", "--heads=4", "--kv_heads=2", "--head_dim=16", "--block_size=16",
              "--block_count=2", "--window_size=16", "--methods=nsa", "--passes=fwd", "--mode=query_block",
              "--breakdown", "--iters=1", "--warmup=0", "--selection_configs=4:2,8:3", "--flash_configs=32:16:8:3"],
             tmp_path)
    (row,) = r["rows"]
    assert r["flags"]["mode"] == "query_block" and row["nsa"]["ms"] > 0
    stages = row["breakdown_ms"]
    assert set(stages) == {"compression", "compression_fwd_bwd", "window", "window_fwd_bwd", "topk",
                           "selection[4:2]", "selection_fwd_bwd[4:2]", "selection[8:3]", "selection_fwd_bwd[8:3]",
                           "compression[32:16:8:3]", "compression_fwd_bwd[32:16:8:3]", "window[32:16:8:3]",
                           "window_fwd_bwd[32:16:8:3]"}
    assert all(isinstance(ms, float) and ms > 0 for ms in stages.values()), stages


def test_bench_nsa_table_and_breakdown(tmp_path):
    r = _run(["launch.bench", "--seq_lens=128", "--heads=4", "--kv_heads=2", "--head_dim=16", "--block_size=16",
              "--block_count=2", "--window_size=16", "--methods=nsa", "--passes=fwd", "--breakdown", "--iters=1",
              "--warmup=0", "--selection_configs=4:2,8:1:1"], tmp_path)
    (row,) = r["rows"]
    assert row["T"] == 128 and row["nsa"]["ms"] > 0
    stages = row["breakdown_ms"]
    assert {"compression", "window", "topk", "selection[4:2]", "selection_fwd_bwd[4:2]", "selection_index",
            "selection_index_and_fwd_kernel", "selection_bwd", "selection[8:1:1]",
            "selection_fwd_bwd[8:1:1]"} <= set(stages)
    assert all(isinstance(ms, float) and ms > 0 for ms in stages.values()), stages  # no setting failed


def test_bench_generate_runs_each_mode(tmp_path):
    r = _run(["launch.bench_generate", "--preset=tiny", "--video_tokens=64", "--decode_tokens=2",
              "--prefill_iters=1", "--modes=dense,videonsa"], tmp_path)
    assert [row["mode"] for row in r["rows"]] == ["dense", "videonsa"] and r["vision_tower_s"] > 0
    for row in r["rows"]:
        assert row["video_tokens"] == 64 and row["prompt_tokens"] == 64 + 62
        assert row["prefill_s"] > 0 and row["cache_slots"] >= row["prompt_tokens"] + 2 * 2 + 1
        assert abs(row["decode_tokens_per_s"] * row["decode_s"] - 2) < 1e-6


def test_bench_videonsa_mode_and_plot(tmp_path):
    """Mode videonsa times the released layer's attention core and its stages; plot_bench draws the bench JSON's
    series (ms against T) and prints exactly those values."""
    r = _run(["launch.bench", "--seq_lens=64,80", "--heads=4", "--kv_heads=2", "--head_dim=16", "--block_size=16",
              "--block_count=2", "--window_size=16", "--methods=nsa", "--passes=fwd", "--mode=videonsa",
              "--iters=1", "--warmup=0", "--breakdown", "--selection_configs=4:2,2:3"], tmp_path)
    assert r["flags"]["mode"] == "videonsa" and [row["T"] for row in r["rows"]] == [64, 80]
    assert all(row["nsa"]["ms"] > 0 for row in r["rows"])
    for row in r["rows"]:  # the released layer's stages, timed apart
        stages = row.pop("breakdown_ms")
        assert set(stages) == {"compression", "window", "topk", "selection", "selection[2:3]", "dense_branch"}, stages
        assert all(ms > 0 for ms in stages.values())
    r["rows"][1]["cudnn"] = {"error": "not on CPU"}  # a failed method is left out of the plot
    (tmp_path / "bench.json").write_text(json.dumps({**r, "flags": {**r["flags"], "methods": ["nsa", "cudnn"]}}))
    native = {"flags": {"mode": "native", "methods": ["nsa"]}, "rows": [{"T": 64, "pass": "fwd", "nsa": {"ms": 2.5}}]}
    (tmp_path / "all.json").write_text(json.dumps([native]))  # a file may hold a list of results
    png = tmp_path / "bench.png"
    out = subprocess.run([sys.executable, "-m", "launch.plot_bench", f"--inputs={tmp_path / 'bench.json'},"
                          f"{tmp_path / 'all.json'}", f"--out={png}"], check=True, capture_output=True, text=True).stdout
    drawn = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert drawn == [{"mode": "videonsa", "pass": "fwd", "method": "nsa", "T": [64, 80],
                      "ms": [row["nsa"]["ms"] for row in r["rows"]]},
                     {"mode": "native", "pass": "fwd", "method": "nsa", "T": [64], "ms": [2.5]}]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_time_budget_records_what_it_skipped(tmp_path):
    r = _run(["launch.bench", "--seq_lens=64,80", "--heads=4", "--kv_heads=2", "--head_dim=16", "--block_size=16",
              "--block_count=2", "--window_size=16", "--methods=nsa", "--passes=fwd", "--iters=1", "--warmup=0",
              "--time_budget_s=1e-9"], tmp_path)
    assert [(row["T"], row["nsa"]) for row in r["rows"]] == [
        (64, {"error": "skipped: --time_budget_s=1e-09 ran out"}), (80, {"error": "skipped: --time_budget_s=1e-09 ran out"})]
