from tests.service_fixtures import tiny_weights  # noqa: F401
