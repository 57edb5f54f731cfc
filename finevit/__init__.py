"""finevit package."""
