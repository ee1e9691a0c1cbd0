"""onprem: an on-prem connectivity agent and its control plane.

Everything the distribution installs lives under this one name, so that it collides with no other software:
``onprem.agent`` (the agent inside the private network), ``onprem.control_plane`` (the server agents dial),
``onprem.tunnel`` (the protocol and asyncio shell both share), ``onprem.operator_cli`` (the ``onprem``
command) and ``onprem.v1`` (the code generated from ``protos/``). In the repository the packages stay at the
top level and this folder links to them; the wheel holds them here.
"""
