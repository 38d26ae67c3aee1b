"""Observability: metrics and logs, both views of the event stream."""
