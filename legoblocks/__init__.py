"""legoblocks package."""
