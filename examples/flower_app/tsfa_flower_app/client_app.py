"""The ClientApp: local training with the orthogonality penalty, error profile, SOFT payload."""

from fedloop.flower import client_app as app

__all__ = ["app"]
