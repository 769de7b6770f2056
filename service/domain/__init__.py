"""service/domain."""
