"""Exercise checks for lessons 01 04 (filled in by that lesson's issue)."""
