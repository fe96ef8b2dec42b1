"""Not implemented yet (placeholder so the package imports)."""
