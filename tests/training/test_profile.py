"""The step profile's attribution (nsa_jax/training/profile.py) on a hand-written GPU trace and HLO module, whose
breakdown is worked out by hand below; the real trace of a step is checked in tests/launch/test_bench_scripts.py."""

from nsa_jax.training import profile

HLO = """HloModule jit_full_step, entry_computation_layout={(f32[2]{0})->f32[2]{0}}

%body (p: (f32[2], f32[2])) -> (f32[2], f32[2]) {
  %p = (f32[2]{0}, f32[2]{0}) parameter(0)
  %fusion.1 = f32[2]{0} fusion(f32[2]{0} %x), kind=kLoop, calls=%c, metadata={op_name="jit(full_step)/transpose(jvp(vision_tower))/mul" source_file="v.py"}
  ROOT %t = (f32[2]{0}, f32[2]{0}) tuple(%fusion.1, %fusion.1)
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %custom-call.3 = (bf16[8,128]{1,0}, f32[8]{0}) custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(full_step)/jvp()/while/body/attention_core/pallas_call"}
  %cublas-gemm.2 = (f32[4,4]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(full_step)/jvp()/while/body/dot_general"}
  %all-gather-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%a), dimensions={0}, metadata={op_name="jit(full_step)/transpose(jvp())/attention_core/all_gather"}
  %gemm_fusion_dot.7 = f32[4,4]{1,0} fusion(%a), kind=kCustom, calls=%g, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}, metadata={op_name="jit(full_step)/transpose(jvp(loss))/rematted_computation/dot_general"}
  %fmha = (bf16[1,8,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(full_step)/jvp()/while/body/attention_core/dot_product_attention"}
  %multiply.9 = f32[2]{0} multiply(%a, %a), metadata={op_name="jit(full_step)/optimizer/mul"}
  ROOT %while.5 = (f32[2]{0}, f32[2]{0}) while(%t0), condition=%cond, body=%body
}
"""


def _trace():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    ev = lambda op, us, tid=10, pid=2, module="jit_full_step": {
        "ph": "X", "pid": pid, "tid": tid, "name": op, "dur": us, "args": {"hlo_op": op, "hlo_module": module}}
    return {"traceEvents": meta + [
        ev("fusion.1", 200), ev("fusion.1", 200),  # the body ran twice
        ev("custom-call.3", 600), ev("cublas-gemm.2", 100), ev("all-gather-start", 40),
        ev("gemm_fusion_dot.7", 50), ev("fmha", 30), ev("multiply.9", 10),
        ev("while.5", 5000),  # encloses others' time: skipped
        ev("fusion.1", 999, tid=11),  # the derived "XLA Ops" line repeats the stream's kernels: skipped
        ev("fusion.1", 999, pid=1, tid=3),  # host thread: skipped where the trace has devices
        ev("fusion.4", 70, module="jit_init"),  # another program
        ev("fusion.99", 8),  # not in the module's text
    ]}


def test_breakdown_by_part_phase_and_kind():
    r = profile.breakdown(_trace(), HLO, steps=2)
    # 400 + 600 + 100 + 40 + 50 + 30 + 10 = 1230 us over 2 steps.
    assert r["device_ms_per_step"] == 0.615
    assert r["by_part"] == {"attention core": 0.335, "vision tower": 0.2, "language (rest)": 0.05, "loss": 0.025,
                            "optimizer": 0.005}
    assert r["by_phase"] == {"forward": 0.37, "backward": 0.22, "recompute": 0.025}
    assert r["by_kind"] == {"Pallas / Triton kernel": 0.3, "other": 0.205, "matmul": 0.075,
                            "collective": 0.02, "cuDNN attention": 0.015}
    assert {k: v for k, v in r["cells"][0].items() if k != "top_ops"} == {
        "part": "attention core", "phase": "forward", "kind": "Pallas / Triton kernel", "ms": 0.3}
    other = {(c["part"], c["phase"], c["kind"]): c["top_ops"] for c in r["cells"]}
    assert [(o["op"], o["ms"]) for o in other["vision tower", "backward", "other"]] == [("fusion.1", 0.2)]
    assert [o["op"] for o in other["attention core", "forward", "cuDNN attention"]] == ["fmha"]
    assert [o["op"] for o in r["top_ops"][:2]] == ["custom-call.3", "fusion.1"]
    assert r["other_programs_ms_per_step"] == 0.035 and r["unattributed_ms_per_step"] == 0.004
    assert [(u["hlo_op"], u["ms"], u["event"]["name"]) for u in r["unattributed_top"]] == [("fusion.99", 0.004,
                                                                                             "fusion.99")]


def test_instruction_text_in_the_event_places_an_unknown_name():
    """A kernel whose hlo_op is not among the module's instruction names is placed by its event's long_name
    (the instruction's text), where the trace has one."""
    trace = _trace()
    trace["traceEvents"].append({"ph": "X", "pid": 2, "tid": 10, "name": "k", "dur": 20, "args": {
        "hlo_op": "%fusion.77", "hlo_module": "jit_full_step", "long_name": '%fusion.77 = bf16[4]{0} fusion(%a), '
        'kind=kLoop, calls=%f, metadata={op_name="jit(full_step)/jvp(vision_tower)/add"}'}})
    r = profile.breakdown(trace, HLO, steps=2)
    assert r["by_part"]["vision tower"] == 0.21 and r["unattributed_ms_per_step"] == 0.004


def test_instructions_parse_tuple_types_and_targets():
    ins = profile.hlo_instructions(HLO)
    assert ins["custom-call.3"].opcode == "custom-call" and ins["custom-call.3"].target == "__gpu$xla.gpu.triton"
    assert ins["gemm_fusion_dot.7"].target == "gemm" and ins["fusion.1"].target == "kLoop"
    assert ins["all-gather-start"].opcode == "all-gather-start" and ins["while.5"].opcode == "while"
    assert ins["multiply.9"].op_name == "jit(full_step)/optimizer/mul"


def test_idle_time_is_charged_to_the_kernel_after_each_gap():
    """Gaps between kernels (on any stream; the while's enclosing event does not fill them): worked by hand."""
    ev = lambda op, ts, us, tid=10: {"ph": "X", "pid": 2, "tid": tid, "name": op, "ts": ts, "dur": us,
                                     "args": {"hlo_op": op, "hlo_module": "jit_full_step"}}
    trace = _trace()
    stream = {"ph": "M", "pid": 2, "tid": 12, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}}
    trace["traceEvents"] = trace["traceEvents"][:4] + [
        stream,
        ev("while.5", 0, 1000),
        ev("custom-call.3", 0, 100),
        ev("fmha", 150, 100),  # 50 us idle before it
        ev("multiply.9", 160, 40, tid=12),  # within fmha's time, on another stream: no gap
        ev("fusion.1", 400, 50),  # 150 us idle after fmha's end
        ev("fmha", 470, 30),  # 20 us idle
    ]
    r = profile.breakdown(trace, HLO, steps=2)
    assert r["idle_ms_per_step"] == 0.11
    assert [(g["op_name"], g["gaps_per_step"], g["ms"]) for g in r["idle_before"]] == [
        ("jit(full_step)/transpose(jvp(vision_tower))/mul", 0.5, 0.075),
        ("jit(full_step)/jvp()/while/body/attention_core/dot_product_attention", 1.0, 0.035)]
