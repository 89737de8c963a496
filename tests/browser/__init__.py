"""Helpers for tests/test_browser.py: start JupyterLab / Voilà, drive them with Playwright."""
