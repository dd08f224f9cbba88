"""The safety rules over migration files (Python AST) and the SQL they send."""
