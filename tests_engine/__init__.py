"""Engine tests that run without Home Assistant (on mcp 1.12 and on the newest mcp)."""
