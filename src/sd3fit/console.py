"""What the terminal shows of a training run by default: sd3fit's own lines and one progress line.

Everything the trainer prints still goes to the run's train.log (`sd3fit.launch`); the console gets only the lines
that begin with `sd3fit` and a progress line built from the rows of metrics.jsonl:

    step 120/2000  loss 0.1234  0.52 s/step  GPU 9.81 GiB  ETA 16:17

redrawn in place on a terminal, and printed at every tenth of the run otherwise (logs, pipes). `sd3fit train
--verbose` shows the trainer's own output instead, as it comes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

OWN_PREFIX = b"sd3fit"
STARTING = "starting the trainer: loading the model, caching text embeddings and latents ..."


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(step: int, total: int | None, rows: list[dict]) -> str:
    """The progress text after `rows` (this attempt's metrics rows, oldest first; the last is `step`)."""
    last = rows[-1]
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    loss = last.get("train_loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
    if len(rows) > 1 and rows[-1]["step"] > rows[0]["step"]:
        per_step = (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])
    else:
        per_step = last.get("time/step_s") or last.get("seconds_per_step")
    if isinstance(per_step, (int, float)) and per_step > 0:
        parts.append(f"{per_step:.2f} s/step")
    memory = last.get("mem/peak_reserved_gib")
    if isinstance(memory, (int, float)):
        parts.append(f"GPU {memory:.2f} GiB")
    if total and isinstance(per_step, (int, float)) and per_step > 0 and step < total:
        parts.append(f"ETA {_clock((total - step) * per_step)}")
    return "  ".join(parts)


class Console:
    def __init__(self, metrics: Path, total: int | None, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.metrics = Path(metrics)
        self.total = total
        self._pending = b""  # the trainer's output after its last line end
        # rows already in the file (a resumed run) are not this attempt's: start after them
        self._offset = self.metrics.stat().st_size if self.metrics.is_file() else 0
        self._partial = ""
        self._rows: list[dict] = []
        # the progress line on screen (terminal only); loading and caching come before the first step
        self._drawn = STARTING if self.tty else ""
        self._printed_tenth = -1
        self._draw()

    def say(self, line: str) -> None:
        """One of sd3fit's own lines, above the progress line."""
        self._clear()
        print(line, file=self.stream, flush=True)
        self._draw()

    def feed(self, chunk: bytes) -> None:
        """Output of the trainer: only whole lines that are sd3fit's own are shown."""
        self._pending += chunk
        *lines, self._pending = self._pending.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            if line.startswith(OWN_PREFIX):
                self.say(line.decode(errors="replace"))

    def tick(self) -> None:
        """Read the rows logged since the last call and show the progress."""
        if not self.metrics.is_file():
            return
        with self.metrics.open() as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        *lines, self._partial = (self._partial + text).split("\n")
        new = False
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("time"), (int, float)):
                self._rows.append(row)
                new = True
        if not new:
            return
        step = self._rows[-1]["step"]
        text = progress_line(step, self.total, self._rows)
        if self.tty:
            self._clear()
            self._drawn = text
            self._draw()
            return
        tenth = math.floor(10 * step / self.total) if self.total else step
        if tenth > self._printed_tenth or step == self.total:
            self._printed_tenth = tenth
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.tick()
        if self.tty and self._drawn:
            print(file=self.stream, flush=True)
            self._drawn = ""

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(self._drawn)
            self.stream.flush()
