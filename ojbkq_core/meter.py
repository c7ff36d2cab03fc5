"""Progress of a long table on standard error: which row of how many, what it is doing (calibrating
block b of B, evaluating window w of W), and the time left, estimated from what has run so far.

    meter = Meter(rows=6, eval_seconds=32.0)     # eval_seconds: one row's evaluation (the fp row's)
    meter.start_row(1, "gptq 3 bits")
    meter.step("calibrating block", 12, 30)      # from calibration's block_done
    meter.step("evaluating window", 5, 32)       # from perplexity's on_window
    meter.end_row()

On a terminal one line is redrawn at every step; elsewhere (a log file, CI) a line is printed at most
every `every` seconds, so a log shows that the table moves without a line per block.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from .calibrate import Events


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Meter:
    """The table's progress: `rows` rows after the full-precision one; `eval_seconds`, one row's
    evaluation as measured on the full-precision row, counts in each row's time left until a row has
    been evaluated."""

    def __init__(self, rows: int, eval_seconds: float = 0.0, every: float = 30.0, stream: Optional[TextIO] = None):
        self.rows, self.eval_seconds, self.every = rows, eval_seconds, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done_seconds: list[float] = []
        self.row, self.label, self.t_row, self.t_phase, self.t_step, self.phase = 0, "", 0.0, 0.0, 0.0, ""
        self.last = float("-inf")

    def start_row(self, index: int, label: str) -> None:
        self.row, self.label = index, label
        self.t_row = self.t_phase = self.t_step = time.perf_counter()
        self.phase = ""
        self.last = time.perf_counter()            # the first line comes `every` seconds into the row

    def step(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if phase != self.phase:                      # a phase starts where the last step of the one before ended
            self.phase, self.t_phase = phase, self.t_step
        self.t_step = now
        if not self.tty and now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = now - self.t_phase
        left = elapsed / done * (total - done) if done else None
        if left is not None and phase.startswith("calibrating"):
            left += self.eval_seconds
        line = (f"  row {self.row}/{self.rows} {self.label}: {phase} {done}/{total}, "
                f"{_clock(now - self.t_row)} in the row" + ("" if left is None else f", ~{_clock(left)} left in it"))
        table = self.table_left(left)
        if table is not None:
            line += f"; table ~{_clock(table)} left"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def table_left(self, row_left: Optional[float]) -> Optional[float]:
        """The rows after this one at the mean of the rows done, plus this row's time left."""
        if not self.done_seconds or row_left is None:
            return None
        return row_left + sum(self.done_seconds) / len(self.done_seconds) * (self.rows - self.row)

    def end_row(self) -> float:
        """The row's seconds (its evaluation then counts as measured for the rows after it)."""
        now = time.perf_counter()
        if self.phase.startswith("evaluating"):
            self.eval_seconds = now - self.t_phase
        seconds = now - self.t_row
        self.done_seconds.append(seconds)
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        return seconds


class BlockMeter(Events):
    """Calibration's events, with each finished block reported to `meter`."""

    def __init__(self, meter: Meter, blocks: int):
        self.meter, self.blocks = meter, blocks

    def block_done(self, index, block, progress) -> None:
        self.meter.step("calibrating block", index + 1, self.blocks)


__all__ = ["BlockMeter", "Meter"]
