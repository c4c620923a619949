"""Small built-in models for the demo, the examples and the tests (random weights, no downloads)."""
