"""Flow tests run against Prefect's ephemeral API (one per session), real PostgreSQL and SeaweedFS.

Their fixtures (``prefect_api``, ``flow_env``) live in tests/fixtures_flows.py, shared with
tests/reliability.
"""
