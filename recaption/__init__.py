"""recaption package."""
