"""What the relay tells its operators: metrics, and (later) the tracking log and logging setup."""
