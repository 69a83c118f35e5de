"""The fuzz target runs coverage-guided for a while and finds nothing.

30 seconds in ``make test``; ``make fuzz`` sets POPAUTH_FUZZ_SECONDS higher.
The corpus is kept in .cache/fuzz-corpus, so each run starts where the last
one stopped; a crashing input is written to .cache/fuzz-artifacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
TARGET = Path(__file__).with_name("fuzz_parsers.py")


def test_fuzzing_the_parsers_finds_no_crash() -> None:
    seconds = int(os.environ.get("POPAUTH_FUZZ_SECONDS", "30"))
    corpus = ROOT / ".cache" / "fuzz-corpus"
    artifacts = ROOT / ".cache" / "fuzz-artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-max_total_time={seconds}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        cwd=ROOT,
    )
    output = result.stderr + result.stdout
    assert result.returncode == 0, output[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert done is not None, output[-4000:]
    runs = int(done.group(1))
    coverage = re.findall(r"cov: (\d+)", output)
    print(f"fuzz: {runs} executions in {done.group(2)} s, 0 crashes, cov {coverage[-1:]}")
    assert runs > 10_000
