"""What a run says while it trains: a start-up summary, then a progress bar on a terminal, or plain
periodic lines where the output is not one (CI logs, nohup), or nothing at all with ``quiet``."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

PLAIN_EVERY_SECONDS = 30.0


class Progress:
    """Reports training steps. mode: "auto" (a bar on a terminal, plain lines elsewhere), "bar", "plain",
    or "quiet"."""

    def __init__(self, total: int, initial: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode, self.total, self.valid_bpb, self._last_line = mode, total, None, 0.0
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream)

    def say(self, line: str) -> None:
        """A line of its own (above the bar when there is one)."""
        if self.mode == "quiet":
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def validated(self, step: int, bpb: float) -> None:
        self.valid_bpb = bpb
        if self.mode == "plain":
            self.say(f"step {step}/{self.total}: valid {bpb:.4f} bits/byte")

    def step(self, done: int, loss: float, tokens_per_s: float) -> None:
        bpb = loss / math.log(2)
        if self.bar is not None:
            shown = {"loss": f"{loss:.3f}", "bpb": f"{bpb:.3f}", "tok_s": f"{tokens_per_s:.0f}"}
            if self.valid_bpb is not None:
                shown["valid_bpb"] = f"{self.valid_bpb:.3f}"
            self.bar.set_postfix(shown)
            self.bar.update(1)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last_line >= PLAIN_EVERY_SECONDS or done == self.total:
                self._last_line = now
                self.say(f"step {done}/{self.total}: loss {loss:.4f} ({bpb:.3f} bits/byte), "
                         f"{tokens_per_s:.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
