"""tests/service/api/edge."""
