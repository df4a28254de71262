"""The trace digest on a hand-made trace whose answers are known."""

from sd3fit.measure import digest


def ev(name, ts, dur, cat="cpu_op", tid=1):
    return {"name": name, "ph": "X", "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid}


TRACE = {"traceEvents": [
    ev("ProfilerStep#1", 0, 1000, "user_annotation"),
    ev("train_step", 0, 900, "user_annotation"),
    ev("data", 0, 100, "user_annotation"),
    ev("optimizer", 700, 200, "user_annotation"),
    ev("aten::linear", 100, 300),
    ev("aten::addmm", 150, 200),  # inside linear: linear's self time is 100
    ev("aten::_scaled_dot_product_flash_attention", 400, 100),
    ev("aten::add_", 700, 50),
    ev("ampere_bf16_gemm_128x64", 160, 150, "kernel", tid=7),
    ev("flash_fwd_kernel", 410, 80, "kernel", tid=7),
    ev("elementwise_kernel", 480, 20, "kernel", tid=7),  # overlaps flash by 10
    ev("aten::mm", 2000, 500),  # outside any profiled step: ignored
]}


def test_self_times_and_gpu_shares():
    s = digest.summarize(TRACE)
    ops = dict(s["top_operators"])
    assert ops["aten::linear"] == 100 and ops["aten::addmm"] == 200 and "aten::mm" not in ops
    assert s["device"] == "gpu" and s["wall_ms"] == 1.0
    assert dict(s["top_kernels"])["ampere_bf16_gemm_128x64"] == 150
    shares = s["shares"]
    assert shares["matmul"] == 0.15 and shares["attention"] == 0.08
    assert shares["data"] == 0.1 and shares["optimizer"] == 0.2
    assert abs(shares["idle"] - (1 - 0.24)) < 1e-9  # kernels busy 150 + 90 of 1000 us


def test_cpu_trace_uses_operator_self_time():
    cpu = {"traceEvents": [e for e in TRACE["traceEvents"] if e["cat"] != "kernel"]}
    s = digest.summarize(cpu)
    assert s["device"] == "cpu" and s["top_kernels"] == []
    assert s["shares"]["matmul"] == (100 + 200) / 1000 and s["shares"]["attention"] == 0.1
    assert abs(s["shares"]["idle"] - 0.55) < 1e-9  # top-level operators cover 300 + 100 + 50 of 1000 us
    text = digest.render(s)
    assert "aten::addmm" in text and "matmul" in text
