"""Lightning callbacks with task-level hooks, registered by name for YAML; ``registry`` imports every module here."""
