"""Delivery: scheduler, back-off, router, DSN."""
