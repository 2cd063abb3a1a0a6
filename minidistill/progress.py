"""A progress display for long generation runs (traces, eval): prompts done, tokens/s, ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prompts (or samples) done, generated tokens per second and ETA on stderr: a tqdm bar when tqdm is
    installed, else a plain line every `every_s` seconds."""

    def __init__(self, total: int, desc: str = "generate", unit: str = "prompt", every_s: float = 10.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.tokens = 0
        self.t0 = self.shown = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def rate(self) -> float:  # generated tokens per second so far
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, done: int = 0, tokens: int = 0) -> None:
        self.done, self.tokens = self.done + done, self.tokens + tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(done)
            if now - self.shown >= 0.5:  # postfix text at most twice a second
                self.bar.set_postfix_str(f"{self.rate():.1f} tok/s")
                self.shown = now
        elif now - self.shown >= self.every_s or (done and self.done == self.total):
            eta = (now - self.t0) / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {self.rate():.1f} tok/s, ETA {eta:.0f} s",
                  file=sys.stderr)
            self.shown = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.rate():.1f} tok/s")
            self.bar.close()
