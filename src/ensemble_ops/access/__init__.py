"""Callers of the inference API: their keys, and the limits each key carries."""
