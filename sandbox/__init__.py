"""Local peers and generated sample studies for the demo, the tests and the benchmarks."""
