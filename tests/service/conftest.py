"""The in-process app of the route tests, for the other service tests (the CLI's) too."""

from tests.service.api.routes.conftest import api_settings, client, fast_lanes

__all__ = ["api_settings", "client", "fast_lanes"]
