"""A workload of its own for `suggest-indexes`: 300k rows, queries recorded by pg_stat_statements
on the private cluster. Some an index helps (a unique-ish email, a high-cardinality sku); some it
cannot (a three-valued country or status, a 12-row table, a column already indexed)."""

from __future__ import annotations

import random
import uuid

import psycopg2
import pytest

CUSTOMERS, ORDERS = 100_000, 200_000

SCHEMA = f"""
CREATE TABLE customers (id serial PRIMARY KEY, email text NOT NULL, country text NOT NULL,
                        created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers (id),
                     status text NOT NULL, sku text NOT NULL, total numeric NOT NULL);
CREATE INDEX orders_customer_id ON orders (customer_id);
CREATE TABLE flags (id serial PRIMARY KEY, name text NOT NULL, enabled boolean NOT NULL);
INSERT INTO customers (email, country)
    SELECT 'user' || g || '@example.org', (ARRAY['fr', 'de', 'it'])[1 + g % 3]
    FROM generate_series(1, {CUSTOMERS}) g;
INSERT INTO orders (customer_id, status, sku, total)
    SELECT 1 + g % {CUSTOMERS}, (ARRAY['new', 'paid', 'shipped'])[1 + g % 3], 'SKU-' || (g * 7919) % 150000,
           g % 20000
    FROM generate_series(1, {ORDERS}) g;
INSERT INTO flags (name, enabled) SELECT 'flag' || g, g % 2 = 0 FROM generate_series(1, 12) g;
"""

HELPED = {"customers (email)", "orders (sku)"}


def _missing(url: str) -> str | None:
    """Why this server cannot run the workload (None when it can)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'")
            if cur.fetchone() is None:
                return "HypoPG is not installed: run scripts/ensure-system-packages (postgresql-15-hypopg)"
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            cur.execute("SELECT count(*) FROM pg_stat_statements")
        return None
    except psycopg2.Error:
        return "pg_stat_statements is not loaded by this server (shared_preload_libraries)"
    finally:
        conn.close()


def make_workload(pg_server_url: str):
    """Yield the URL of a database of 300k rows whose queries pg_stat_statements recorded (dropped afterwards)."""
    name = f"advise_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = pg_server_url.rsplit("/", 1)[0] + "/" + name
    missing = _missing(url)
    if missing:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE "{name}"')
        admin.close()
        pytest.skip(missing)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
            cur.execute("VACUUM ANALYZE")  # as a live database's tables are: all-visible, analyzed
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database "
                        "WHERE datname = current_database()), 0)")
            rng = random.Random(7)
            for _ in range(30):
                cur.execute("SELECT * FROM customers WHERE email = %s",
                            (f"user{rng.randint(1, CUSTOMERS)}@example.org",))
                cur.execute("SELECT id, total FROM orders WHERE sku = %s",
                            (f"SKU-{rng.randint(0, 149999)}",))
                cur.execute("SELECT * FROM customers WHERE country = %s", ("fr",))
                cur.execute("SELECT * FROM orders WHERE status = %s", ("paid",))
                cur.execute("SELECT * FROM orders WHERE customer_id = %s", (rng.randint(1, CUSTOMERS),))
                cur.execute("SELECT enabled FROM flags WHERE name = %s", (f"flag{rng.randint(1, 12)}",))
    finally:
        conn.close()
    yield url
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
