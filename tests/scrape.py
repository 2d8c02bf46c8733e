"""Read a server's ``/metrics`` with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# Every value the request meter's ``op`` label may take (ivvae.api.metering).
OPS = {"encode", "decode", "frames", "models", "other", "unrouted"}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in an exposition."""
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of ``url``/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        return samples(reply.read().decode())


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for n, have, value in found
               if n == name and all(have.get(k) == v for k, v in labels.items()))


def requests(found: list[tuple[str, dict[str, str], float]], op: str, transport: str,
             outcome: str) -> float:
    return total(found, "ivvae_requests_total", op=op, transport=transport, outcome=outcome)


def errors(found: list[tuple[str, dict[str, str], float]], code: str) -> float:
    return total(found, "ivvae_errors_total", code=code)


def ops(found: list[tuple[str, dict[str, str], float]]) -> set[str]:
    """Every ``op`` label value in the exposition."""
    return {labels["op"] for _, labels, _ in found if "op" in labels}
