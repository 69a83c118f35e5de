"""Files for Postfix's tools, written as if long ago.

postconf and postmap wait up to 2 s for a main.cf or a table whose mtime is
not yet in the past ("file being modified"); tests backdate what they write.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_settled(path: Path, text: str) -> Path:
    path.write_text(text)
    past = time.time() - 10
    os.utime(path, (past, past))
    return path
