"""Reading benchmarks into one shape, encoding them, and serving them task by task."""
