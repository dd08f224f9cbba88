"""Post-checks: the models against the live schema, invalid indexes."""
