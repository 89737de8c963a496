"""Exercise checks for lessons 05 07 (filled in by that lesson's issue)."""
