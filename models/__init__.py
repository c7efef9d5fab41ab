"""Small Torch models for tests, benchmarks and the demo."""
