"""Drop-in fast versions of every technique. Never imports `reference` (the two are independent implementations)."""
