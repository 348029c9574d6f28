"""The durable spool: a message is on stable storage before ingress answers 250."""
