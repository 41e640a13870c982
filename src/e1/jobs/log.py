"""Progress lines of a job, on stderr (the rule's log), stamped with the time; no torch import."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[e1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
