from __future__ import annotations

from pathlib import Path

from bench.common import BenchResult, Mode


def run(mode: Mode, workdir: Path) -> BenchResult:
    raise NotImplementedError
