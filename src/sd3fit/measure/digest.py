"""A short text digest of one profiler trace: where the profiled steps' time went.

- top operators by self time (time in the operator minus the operators it called), on the CPU threads;
- top GPU kernels by time (GPU traces);
- shares of the profiled steps' wall time: attention and matrix multiplies (GPU kernel time on a GPU trace,
  operator self time on a CPU-only trace), sd3fit's `data` and `optimizer` ranges, and idle (GPU trace: no kernel
  running; CPU trace: the training thread inside no operator, i.e. Python and waiting);
- the host's reads of GPU values (`aten::_local_scalar_dense`: every `.item()`, `.tolist()` or `if tensor`, each
  a wait for the GPU to finish all it was given) by call site: the innermost Python frame outside torch when the
  trace has Python stacks (`profiler_with_stack=true`), otherwise sd3fit's range around it.
"""

from __future__ import annotations

import re
from collections import defaultdict

from sd3fit.measure import trace as traces

ATTENTION = re.compile(r"attention|attn|sdpa|flash|fmha|softmax", re.I)
MATMUL = re.compile(r"gemm|matmul|aten::mm\b|aten::bmm|aten::addmm|aten::linear|cutlass|cublas|xmma|nvjet|_mm_", re.I)


def _self_times(ops: list[traces.Span]) -> dict[str, float]:
    """Self time per operator name: nesting is by containment on the same thread."""
    totals: dict[str, float] = defaultdict(float)
    by_thread: dict[object, list[traces.Span]] = defaultdict(list)
    for op in ops:
        by_thread[op.tid].append(op)
    for thread_ops in by_thread.values():
        thread_ops.sort(key=lambda s: (s.start, -s.dur))
        stack: list[list] = []  # [span, time spent in children]
        for op in thread_ops + [None]:
            while stack and (op is None or not stack[-1][0].contains(op)):
                span, children = stack.pop()
                totals[span.name] += max(span.dur - children, 0.0)
                if stack:
                    stack[-1][1] += span.dur
            if op is not None:
                stack.append([op, 0.0])
    return totals


HOST_READ = "aten::_local_scalar_dense"
_FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): (?P<func>.+)$")


def _call_site(read: traces.Span, frames: list[traces.Span], ranges: list[traces.Span]) -> str:
    """Where a host read came from: the innermost Python frame around it that is not torch's own, else the range."""
    best = None
    for frame in frames:
        found = _FRAME.match(frame.name)
        if frame.tid != read.tid or not frame.contains(read) or not found:
            continue
        path = found["file"].replace("\\", "/").split("site-packages/")[-1]
        if path.startswith(("torch/", "<")):
            continue
        if best is None or frame.start >= best[0].start:
            best = (frame, f"{path}({found['line']}): {found['func']}")
    if best is not None:
        return best[1]
    around = [r for r in ranges if r.contains(read) and r.name in traces.RANGES]
    return f"in range {around[-1].name}" if around else "outside sd3fit's step ranges"


def _host_reads(ops: list[traces.Span], frames: list[traces.Span], ranges: list[traces.Span]) -> list:
    sites: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for read in (op for op in ops if op.name == HOST_READ):
        site = sites[_call_site(read, frames, ranges)]
        site[0] += 1
        site[1] += read.dur
    return sorted(((name, n, us) for name, (n, us) in sites.items()), key=lambda row: -row[2])


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _within(spans: list[traces.Span], windows: list[traces.Span]) -> list[traces.Span]:
    return [s for s in spans if any(w.start <= s.start < w.end for w in windows)]


def summarize(trace: dict, top: int = 10) -> dict:
    steps = [ps.step for ps in traces.profiled_steps(trace)]
    wall = sum(s.dur for s in steps)
    ops = _within(traces.spans(trace, "cpu_op"), steps)
    kernels = _within(traces.spans(trace, "kernel"), steps)
    annotations = traces.spans(trace, "user_annotation")
    op_self = _self_times(ops)
    kernel_time: dict[str, float] = defaultdict(float)
    for k in kernels:
        kernel_time[k.name] += k.dur

    def share(value: float) -> float:
        return value / wall if wall else 0.0

    in_steps = _within(annotations, steps)
    ranges = {name: share(sum(a.dur for a in in_steps if a.name == name)) for name in ("data", "optimizer")}
    if kernels:
        basis = kernel_time
        idle = 1.0 - share(_union([(k.start, k.end) for k in kernels]))
    else:
        basis = op_self
        main_tid = steps[0].tid if steps else None
        top_level = [(o.start, o.end) for o in ops if o.tid == main_tid]
        idle = 1.0 - share(_union(top_level))
    return {
        "profiled_steps": len(steps),
        "wall_ms": wall / 1000,
        "device": "gpu" if kernels else "cpu",
        "top_operators": sorted(op_self.items(), key=lambda kv: -kv[1])[:top],
        "top_kernels": sorted(kernel_time.items(), key=lambda kv: -kv[1])[:top],
        "host_reads": _host_reads(ops, _within(traces.spans(trace, "python_function"), steps), in_steps),
        "shares": {
            "attention": share(sum(v for k, v in basis.items() if ATTENTION.search(k))),
            "matmul": share(sum(v for k, v in basis.items() if MATMUL.search(k) and not ATTENTION.search(k))),
            "optimizer": ranges["optimizer"],
            "data": ranges["data"],
            "idle": max(idle, 0.0),
        },
    }


def render(summary: dict, source: str = "") -> str:
    lines = [f"trace {source}".rstrip(), f"{summary['profiled_steps']} profiled steps, {summary['wall_ms']:.1f} ms in all"]
    basis = "GPU kernel time" if summary["device"] == "gpu" else "operator self time (CPU trace)"
    lines.append(f"share of step time ({basis} for attention and matmul):")
    idle_meaning = "no kernel running" if summary["device"] == "gpu" else "training thread in no operator"
    labels = {"attention": "attention", "matmul": "matmul", "optimizer": "optimizer range", "data": "data range", "idle": f"idle ({idle_meaning})"}
    for key, label in labels.items():
        lines.append(f"  {label:40} {100 * summary['shares'][key]:6.1f} %")
    width = 70
    lines.append("top operators by self time:")
    for name, us in summary["top_operators"]:
        lines.append(f"  {us / 1000:10.2f} ms  {name[:width]}")
    if summary["top_kernels"]:
        lines.append("top GPU kernels by time:")
        for name, us in summary["top_kernels"]:
            lines.append(f"  {us / 1000:10.2f} ms  {name[:width]}")
    reads = summary.get("host_reads") or []
    lines.append(f"host reads of GPU values ({HOST_READ}) by call site: {sum(n for _, n, _ in reads)}")
    for site, n, us in reads:
        lines.append(f"  {us / 1000:10.2f} ms  {n:4d} x  {site[:width + 30]}")
    return "\n".join(lines)
