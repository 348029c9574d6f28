"""The composition root: the running relay (``relay``: preflight, spool, delivery, ingress and admin in
one exit stack), ``serve`` with signals and the systemd notify protocol (``notify``: READY, STATUS,
STOPPING, the watchdog), the console's adapter (``console``) and the no-config demo (``demo``)."""
