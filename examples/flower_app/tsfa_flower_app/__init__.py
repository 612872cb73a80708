"""Flower app wrapper around fedloop.flower (TSFA + SOFT)."""
