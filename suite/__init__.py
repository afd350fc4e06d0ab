"""suite package."""
