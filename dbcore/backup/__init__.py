"""Backups to S3-compatible storage and back: pg_dump streamed through zstd, verify, restore."""
