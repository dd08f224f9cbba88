"""Fixtures for a real S3-compatible server (SeaweedFS on 127.0.0.1) — filled in by the backup work."""
