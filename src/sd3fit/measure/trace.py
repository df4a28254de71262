"""Reading torch.profiler's Chrome-trace JSON: profiled steps, sd3fit's ranges in them, and their structure.

Each profiled trip through the loop is a `ProfilerStep#N` range on the training thread. sd3fit's ranges are
`user_annotation` events on the same thread: one `train_step` holding `data`, `forward`, `loss`, `backward`,
`optimizer` as siblings. At an epoch's end the trainer fetches from an exhausted loader, finds no batch and starts
the next epoch within the same profiler step: that fetch shows as an extra `train_step` holding only `data`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from sd3fit.errors import UserError
from sd3fit.measure.steps import RANGES, STEP_RANGE


def load(path: Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            trace = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read trace {path} ({type(exc).__name__}); was it cut short? train again to get a new one") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise UserError(f"{path} is not a Chrome trace (no traceEvents list); give a .pt.trace.json written by torch.profiler")
    return trace


@dataclass(frozen=True)
class Span:
    name: str
    start: float  # microseconds
    dur: float
    tid: object = None

    @property
    def end(self) -> float:
        return self.start + self.dur

    def contains(self, other: "Span") -> bool:
        return self.start <= other.start and other.end <= self.end


def spans(trace: dict, category: str) -> list[Span]:
    return [
        Span(str(e.get("name")), float(e["ts"]), float(e.get("dur", 0)), e.get("tid"))
        for e in trace["traceEvents"]
        if isinstance(e, dict) and e.get("cat") == category and e.get("ph") == "X" and "ts" in e
    ]


@dataclass
class ProfiledStep:
    step: Span  # ProfilerStep#N
    train_steps: list[Span]  # train_step ranges that trained (more than a data range)
    ranges: list[Span]  # sd3fit's inner ranges inside those
    empty_fetches: int  # train_step ranges holding only `data`: the fetch at an epoch's end


def profiled_steps(trace: dict) -> list[ProfiledStep]:
    annotations = spans(trace, "user_annotation")
    out = []
    for step in sorted((s for s in annotations if s.name.startswith("ProfilerStep#")), key=lambda s: s.start):
        inside = [s for s in annotations if s.tid == step.tid and step.contains(s) and s is not step]
        inner = [s for s in inside if s.name in RANGES]
        outers = [s for s in inside if s.name == STEP_RANGE]
        trained = [o for o in outers if {r.name for r in inner if o.contains(r)} - {"data"}]
        # ranges of empty fetches are left out; ranges inside no train_step stay, to be reported
        ranges = [r for r in inner if any(t.contains(r) for t in trained) or not any(o.contains(r) for o in outers)]
        out.append(ProfiledStep(step, trained, sorted(ranges, key=lambda s: s.start), len(outers) - len(trained)))
    return out


def structure_problems(trace: dict) -> list[str]:
    """Everything wrong with the ranges: each profiled step must hold one train_step with each range once, as
    siblings (none inside another) inside it (besides epoch-end fetches). An empty list means the trace is as
    sd3fit promises."""
    problems = []
    steps = profiled_steps(trace)
    if not steps:
        return ["no ProfilerStep ranges: the profiler recorded no step"]
    for ps in steps:
        label = ps.step.name
        if len(ps.train_steps) != 1:
            problems.append(f"{label}: {len(ps.train_steps)} {STEP_RANGE} ranges, expected 1")
            continue
        outer = ps.train_steps[0]
        names = [r.name for r in ps.ranges]
        for name in RANGES:
            if names.count(name) != 1:
                problems.append(f"{label}: range {name} appears {names.count(name)} times, expected once")
        for r in ps.ranges:
            if not outer.contains(r):
                problems.append(f"{label}: range {r.name} is not inside {STEP_RANGE}")
        for a in ps.ranges:
            for b in ps.ranges:
                if a is not b and a.contains(b) and b.dur > 0:
                    problems.append(f"{label}: range {b.name} is nested inside {a.name}")
        if names != [n for n in RANGES if n in names]:
            problems.append(f"{label}: ranges in order {names}, expected {list(RANGES)}")
    return problems
