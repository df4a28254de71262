import io
import json

from sd3fit.console import STARTING, Console, progress_line


class Terminal(io.StringIO):
    def isatty(self):
        return True


def rows(steps, memory=None):
    return [{"step": n, "time": 100.0 + 0.5 * n, "train_loss": 1.0 / n, "mem/peak_reserved_gib": memory} for n in steps]


def test_progress_line():
    assert progress_line(4, 10, rows([1, 2, 3, 4], memory=9.5)) == "step 4/10  loss 0.2500  0.50 s/step  GPU 9.50 GiB  ETA 0:03"
    # one row: the step's own time; no GPU figure on a CPU; no ETA at the end
    assert progress_line(10, 10, [{"step": 10, "time": 1.0, "train_loss": 0.5, "time/step_s": 2.0}]) == "step 10/10  loss 0.5000  2.00 s/step"
    assert progress_line(7300, 10000, rows([7299, 7300]))[-9:] == "ETA 22:30"
    assert progress_line(2, 10000, rows([1, 2])).endswith("ETA 1:23:19")


def test_console_shows_own_lines_and_progress_only(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(rows([1])[0]) + "\n")  # a row of an earlier attempt (resumed run): not shown
    out = io.StringIO()
    console = Console(metrics, total=20, stream=out)
    console.feed(b"[INFO] loading\nsd3fit: hello\nEpoch 1/1 Steps: 5%\rsd3fit: par")
    console.feed(b"tial line\nwarning: third party\n")
    for row in rows(range(2, 20)):
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        console.tick()
    with metrics.open("a") as f:
        f.write(json.dumps(rows([20])[0])[:20])  # a row half written: read when the rest has come
    console.tick()
    with metrics.open("a") as f:
        f.write(json.dumps(rows([20])[0])[20:] + "\n")
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["sd3fit: hello", "sd3fit: partial line"]
    assert [line.split()[1] for line in lines[2:]] == [f"{n}/20" for n in range(2, 21, 2)]  # every tenth of the run


def test_terminal_redraws_one_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = Terminal()
    console = Console(metrics, total=3, stream=out)
    assert out.getvalue() == STARTING
    for row in rows([1, 2, 3]):
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        console.tick()
    console.say("sd3fit: a message")
    console.close()
    text = out.getvalue()
    assert text.count("\n") == 2 and text.endswith("step 3/3  loss 0.3333  0.50 s/step\n")
    assert "\r\x1b[2Ksd3fit: a message\nstep 3/3" in text
