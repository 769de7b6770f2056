"""tests/service/api."""
