"""Writing the admin's files: ``relay365 init`` (a config from a few answers), ``relay365 config
example`` (the documented example shipped with the package) and ``relay365 service install`` (the
systemd unit, ``unit``; its service user and the config's permissions, ``install``)."""
