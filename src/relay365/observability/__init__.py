"""Metrics, the tracking log and device activity: what every service reports and the console reads."""
