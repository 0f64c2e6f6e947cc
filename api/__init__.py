"""The HTTP API: FastAPI routes that answer OHLCV queries from candlekeep's storage."""
