"""Figures from trained adapters and run records (never imported by the rest of the suite)."""
