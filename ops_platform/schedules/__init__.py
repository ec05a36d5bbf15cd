"""Schedules derived from the spec, each in the platform's timezone."""
