"""PostgreSQL storage (DESIGN.md "Storage"): one module per role, imported by name.

    tables.py       SQLAlchemy metadata (Alembic migrations in alembic/ create the tables)
    db.py           URLs, engines, the embedded-or-configured database, storage_features()
    embedded.py     the embedded PostgreSQL used when CANDLEKEEP_DATABASE_URL is unset
    migrate.py      upgrade() / head_revision() / is_current(): Alembic, programmatically
    partitions.py   ensure_partitions(): native monthly/daily partitions, made on demand
    bars.py         BarStore: idempotent bulk upserts, reads (derived intervals in SQL)
    coverage.py     CoverageStore: what each backfill partition wrote
    instruments.py  InstrumentStore: known and tracked instruments

Nothing here connects at import time.
"""
