"""The onprem agent: holds one outbound stream and runs what the site allows."""

__version__ = "0.1.0"
