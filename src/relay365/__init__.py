"""relay365: get mail from printers, scanners and business applications into Microsoft 365."""

__version__ = "0.1.0"
