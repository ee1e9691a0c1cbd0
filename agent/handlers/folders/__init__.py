"""The folder handler: file operations confined to the agent's folder profiles.

`handler` runs the requests; `paths` is where a path is confined (the one
place a folder path is resolved); `common` holds what every operation shares
(profile roots, name patterns, OS errors as statuses); `scan` lists and polls,
`write` uploads, `temp` makes upload temp files and sweeps stale ones.
"""

from onprem.agent.handlers.folders.common import TEMP_PREFIX
from onprem.agent.handlers.folders.handler import FolderHandler

__all__ = ["TEMP_PREFIX", "FolderHandler"]
