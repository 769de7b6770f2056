"""Tests of workers/reporting."""
