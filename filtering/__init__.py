"""filtering package."""
