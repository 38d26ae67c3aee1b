"""Answer quality: golden sets, running them on a copy, and the rollout gate that judges it."""
