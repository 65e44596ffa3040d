"""Built-in passes, one pass family per module; importing this package registers them."""
