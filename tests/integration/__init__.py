"""End-to-end tests: compile(), the CLI and examples, the model zoo, real CIFAR-10 data, the
benchmark tools."""
