"""Transports: one per upstream option. Each implements :class:`relay365.transports.base.Transport`."""
