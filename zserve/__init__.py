"""zserve."""
