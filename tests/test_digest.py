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


def test_host_reads_are_named_by_call_site():
    frames = [  # what profiler_with_stack=true records: nested Python frames on the training thread
        ev("/venv/lib/python3.12/site-packages/simpletuner/helpers/training/trainer.py(7191): train", 200, 300,
           "python_function"),
        ev("/venv/lib/python3.12/site-packages/torch/_tensor.py(50): item", 250, 100, "python_function"),
        ev("<built-in method item of Tensor object at 0x1>", 260, 80, "python_function"),
    ]
    reads = [ev("aten::_local_scalar_dense", 270, 40), ev("aten::_local_scalar_dense", 450, 10),
             ev("aten::_local_scalar_dense", 800, 30), ev("aten::_local_scalar_dense", 850, 5),
             ev("aten::_local_scalar_dense", 920, 20),  # after train_step ends: bookkeeping
             ev("aten::_local_scalar_dense", 2100, 20)]  # outside any profiled step: ignored
    s = digest.summarize({"traceEvents": TRACE["traceEvents"] + frames + reads})
    assert s["host_reads"] == [("simpletuner/helpers/training/trainer.py(7191): train", 2, 50.0),
                               ("in range optimizer", 2, 35.0), ("outside sd3fit's step ranges", 1, 20.0)]
    text = digest.render(s)
    assert "host reads of GPU values (aten::_local_scalar_dense) by call site: 5" in text
    assert "2 x  simpletuner/helpers/training/trainer.py(7191): train" in text
    assert digest.summarize(TRACE)["host_reads"] == []
