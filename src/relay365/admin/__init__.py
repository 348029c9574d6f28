"""The admin endpoint: Prometheus metrics and a read-only JSON view of the relay."""
