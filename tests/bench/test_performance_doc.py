"""docs/performance.rst shows the figures of the committed results, as generated."""

from __future__ import annotations

import docutils.core

from bench.registry import NAMES
from bench.report import DOCUMENT, LATEST, figures_table, generated_part, load, publishable


def test_the_committed_results_are_a_full_run_of_every_benchmark() -> None:
    report = load(LATEST)
    assert publishable(report) is None
    assert list(report["benchmarks"]) == list(NAMES)


def test_the_figures_table_is_the_one_the_committed_results_give() -> None:
    document = DOCUMENT.read_text(encoding="utf-8")
    assert generated_part(document) == figures_table(load(LATEST)), (
        "run: .venv/bin/python -m bench.report --publish bench/results/latest.json"
    )


def test_the_document_renders_without_warnings() -> None:
    docutils.core.publish_string(
        DOCUMENT.read_text(encoding="utf-8"),
        writer_name="null",
        settings_overrides={"report_level": 2, "halt_level": 2},
    )
