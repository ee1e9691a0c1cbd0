"""The onprem control plane: agents' streams in, operators' calls out, and the store behind both."""

from onprem.tunnel.version import installed_version

__version__ = installed_version()
