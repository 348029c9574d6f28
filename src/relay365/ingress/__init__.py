"""Ingress: the device-facing SMTP server, device identity and policy."""
