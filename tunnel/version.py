"""What `--version` says, and what each process puts in its Hello, Welcome and replica row.

One version for the whole package (the installed distribution's, so that a wheel, a .deb and a
checkout say what they are), beside the tunnel protocol revisions it speaks: two processes talk when
their revisions meet, whatever their versions (`protocol.SUPPORTED_REVISIONS`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from onprem.tunnel.protocol import SUPPORTED_REVISIONS

__all__ = ["installed_version", "version_line"]


def installed_version() -> str:
    """The installed onprem distribution's version, or "0.0.0+unknown" when run from a bare tree."""
    try:
        return version("onprem")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def version_line(program: str) -> str:
    """e.g. "onprem-agent 0.1.0 (tunnel protocol revision 1)"."""
    revisions = ", ".join(str(r) for r in sorted(SUPPORTED_REVISIONS))
    plural = "s" if len(SUPPORTED_REVISIONS) > 1 else ""
    return f"{program} {installed_version()} (tunnel protocol revision{plural} {revisions})"
