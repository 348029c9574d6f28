"""Running relay365 as a system service: the systemd unit (``unit``, ``relay365 service install``) and
the notify protocol (``notify``: READY, STATUS, STOPPING, the watchdog)."""
