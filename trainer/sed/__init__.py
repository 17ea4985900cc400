"""SED: stationarity-aware expert demonstrations from a local LLM; the formulation is in docs/sed.md."""
