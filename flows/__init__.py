"""Prefect flows over dbcore: tasks are thin calls into dbcore; no SQL here."""
