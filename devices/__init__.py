"""Pure device protocol modules: bytes in, events out. No I/O here (a test enforces it)."""
