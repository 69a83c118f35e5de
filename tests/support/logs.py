from __future__ import annotations

import structlog
from structlog.testing import CapturingLogger


def capturing_logger() -> tuple[structlog.typing.FilteringBoundLogger, CapturingLogger]:
    """A bound logger whose events can be asserted on."""
    sink = CapturingLogger()
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        sink, wrapper_class=structlog.make_filtering_bound_logger(0), processors=[]
    )
    return logger, sink


def events(sink: CapturingLogger) -> list[str]:
    return [
        str(call.args[0]) if call.args else str(call.kwargs.get("event")) for call in sink.calls
    ]
