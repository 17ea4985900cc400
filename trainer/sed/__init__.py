"""SED: stationarity-aware expert demonstrations from a local LLM (DESIGN §5)."""
