"""Sensors: new image tags, firing alerts and failed runs turn into runs and alerts."""
