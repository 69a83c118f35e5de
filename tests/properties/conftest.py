"""Hypothesis profiles: "default" for ``make test``, "long" for ``make fuzz``.

No deadline: the machine is shared and noisy, and speed is measured in
benchmarks, never here. The database stays inside the checkout's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_DATABASE = DirectoryBasedExampleDatabase(Path(__file__).parents[2] / ".cache" / "hypothesis")

settings.register_profile(
    "default",
    max_examples=300,
    deadline=None,
    database=_DATABASE,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    database=_DATABASE,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("POPAUTH_HYPOTHESIS_PROFILE", "default"))
