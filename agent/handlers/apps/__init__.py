"""The app handler: HTTP calls confined to the base URLs and path prefixes of the agent's app profiles.

`handler` moves the bytes; `confine` decides what a call may reach (path,
method, headers), `headers` which caller headers could steer the app,
`auth` the credentials a call carries, `errors` what its failures become.
"""

from onprem.agent.handlers.apps.confine import build_url, check_path
from onprem.agent.handlers.apps.handler import AppHandler

__all__ = ["AppHandler", "build_url", "check_path"]
