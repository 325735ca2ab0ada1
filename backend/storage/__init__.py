"""State: key-value store, memory banks, task registry, on-disk caches."""
