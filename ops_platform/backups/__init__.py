"""Backups, restores and their verification: plain Python, one driver module per engine."""
