"""Reload: the per-member state machine and the manager that runs it."""
