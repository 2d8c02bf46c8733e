"""ivvae.server's log rate limit: a flood of one message is cut to a burst per window."""

from __future__ import annotations

import logging

from ivvae.server import RateLimit, limit_logging


class _Keep(logging.Handler):
    """Keeps the messages that pass ``limiter``."""

    def __init__(self, limiter: RateLimit) -> None:
        super().__init__()
        self.records: list[str] = []
        self.addFilter(limiter)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def test_a_flood_of_one_message_is_cut_and_counted() -> None:
    now = [0.0]
    limiter = RateLimit(burst=3, window_s=10, clock=lambda: now[0])
    logger = logging.getLogger("tests.flood")
    handler = _Keep(limiter)
    records = handler.records
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


def test_access_lines_are_limited_per_status_and_route() -> None:
    # uvicorn's access line is one template for every request: 20 a minute in all hid the
    # traffic behind the probes (18 a minute in Kubernetes). Keyed by path, a scanner's
    # new path each time was never cut.
    limiter = RateLimit(burst=3, window_s=60, clock=lambda: 0.0)
    access = logging.getLogger("uvicorn.access")
    refusals = logging.getLogger("ivvae.http")
    handler = _Keep(limiter)
    records = handler.records
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in (access, refusals)]
    for lg in (access, refusals):
        lg.handlers[:] = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        template = '%s - "%s %s HTTP/%s" %d'
        for i in range(50):
            access.info(template, f"10.0.0.{i}:1", "GET", "/healthz", "1.1", 200)
        for i in range(10):
            access.info(template, "10.0.0.9:1", "POST", f"/encode?x={i}", "1.1", 401)
        access.info(template, "10.0.0.9:1", "POST", "/decode", "1.1", 403)
        for i in range(10):  # a scanner: a new path each time, and junk methods
            access.info(template, "10.0.0.7:1", "GET", f"/wp-admin/{i}.php", "1.1", 404)
            access.info(template, "10.0.0.7:1", f"X{i}", "/", "1.1", 400)
        for _ in range(200):  # served traffic flooding one route: a larger budget
            access.info(template, "10.0.0.8:1", "GET", "/models", "1.1", 200)
        for i in range(10):
            refusals.info("%s %s -> %d %s: %s", "POST", "/encode", 413, "too_large", f"{i}")
        refusals.info("%s %s -> %d %s: %s", "POST", "/encode", 400, "invalid_input", "x")
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate, lg.level = propagate, level
    assert sum("/healthz" in r for r in records) == 50  # answers: every one
    assert sum('"POST /encode' in r for r in records) == 3  # one bad request, hammered
    assert sum('"POST /decode' in r for r in records) == 1  # another status: its own budget
    assert sum("/wp-admin/" in r for r in records) == 3  # paths of errors are no key
    assert sum('" 400' in r and '"X' in r for r in records) == 3  # nor junk methods
    assert sum("/models" in r for r in records) == 150  # 50 times the burst
    assert sum("-> 413" in r for r in records) == 3
    assert sum("-> 400" in r for r in records) == 1
