"""Developer tools: tiny random-weight models for tests, demos and benchmarks."""
