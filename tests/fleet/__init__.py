"""Scale-out tests: replicas behind a real HAProxy with a shared real Redis, under load."""
