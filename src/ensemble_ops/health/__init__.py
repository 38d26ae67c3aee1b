"""Health: tri-state member health from events, probes, readiness and liveness."""
