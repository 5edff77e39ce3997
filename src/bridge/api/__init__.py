"""HTTP routes of the bridge (Litestar controllers and handlers)."""
