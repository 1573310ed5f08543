"""Support for the test suite and the benchmarks: not used by the toolkit at run time."""
