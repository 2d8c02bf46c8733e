"""ivvae.server's log rate limit: a flood of one message is cut to a burst per window."""

from __future__ import annotations

import logging

from ivvae.server import RateLimit, limit_logging


def test_a_flood_of_one_message_is_cut_and_counted() -> None:
    now = [0.0]
    limiter = RateLimit(burst=3, window_s=10, clock=lambda: now[0])
    logger = logging.getLogger("tests.flood")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    handler.addFilter(limiter)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.warning("client %d sent garbage", i)
        logger.warning("another message")  # its own budget
        now[0] = 10.0
        logger.warning("client %d sent garbage", 1000)
    finally:
        logger.removeHandler(handler)
    assert records[:3] == ["client 0 sent garbage", "client 1 sent garbage",
                           "client 2 sent garbage"]
    assert records[3] == "another message"
    assert records[4] == "client 1000 sent garbage [997 more like this were not logged]"
    assert len(records) == 5


def test_limit_logging_puts_one_filter_on_each_handler() -> None:
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        limiter = limit_logging()
        limit_logging()
        assert handler.filters.count(limiter) == 1
    finally:
        root.removeHandler(handler)
