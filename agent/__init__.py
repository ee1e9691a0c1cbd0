"""The onprem agent: holds one outbound stream and runs what the site allows."""

from onprem.tunnel.version import installed_version

__version__ = installed_version()
