"""How the commands report user errors: one line naming the problem, no traceback.

Bad input (a missing folder, an unknown preset, a malformed dataset, a checkpoint that does
not match its config) raises FileNotFoundError or ValueError with a message that says what to
do; a traceback adds nothing there. MINIDISTILL_TRACEBACK=1 shows it anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("MINIDISTILL_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
