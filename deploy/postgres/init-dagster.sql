-- Dagster's runs, events and schedules live beside Candlekeep's data, in their own database
-- (CANDLEKEEP_DAGSTER_PG_URL). Runs once, when the TimescaleDB volume is first initialised.
CREATE DATABASE dagster;
