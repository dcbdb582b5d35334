"""Real local services for the tests, the demo and the benchmarks (not used by the plugin)."""
