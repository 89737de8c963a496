"""Exercise checks for lesson 08 (filled in by that lesson's issue)."""
