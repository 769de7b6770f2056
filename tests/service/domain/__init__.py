"""tests/service/domain."""
