"""Getting started: ``relay365 init`` (a config from a few answers) and ``relay365 config example``
(the documented example shipped with the package)."""
