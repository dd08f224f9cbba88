"""Migrations: the files, the replay of applied ones, the history, the lock, plan and execute."""
