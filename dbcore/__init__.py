"""deploy-migrations' database library: plain PostgreSQL + peewee-migrate logic, no orchestration."""
