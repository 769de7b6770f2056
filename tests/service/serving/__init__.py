"""tests/service/serving."""
