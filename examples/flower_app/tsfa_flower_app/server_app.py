"""The ServerApp: fedloop.flower's TsfaStrategy, configured from the run config."""

from fedloop.flower import server_app as app

__all__ = ["app"]
