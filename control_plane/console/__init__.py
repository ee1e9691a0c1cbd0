"""The web console: groups, agents and their health, activity and a few admin actions, in a browser.

Served by the control plane on a listener of its own (`--console-listen`, off by default), over TLS
with the control plane's server certificate, on the same event loop as the gRPC servers
(`listener.Console`, started and stopped by `control_plane.server`). Pages are rendered on the
server from auto-escaping Jinja templates; a little JavaScript refreshes them. Every asset ships in
the package: sites run offline.

It is one more door to the same control plane, not a second one with its own rules:
- login is with an operator token, checked through the token authority exactly as an API call is,
  on every request (`auth`): a revoked or expired token ends its console sessions on their next
  request, and a token sees only its groups;
- what it shows and does goes through `control_plane.fleet`, which the gRPC `AgentService` uses
  too: the same scoping, refusals and audit rows;
- the session is a server-side record named by a random cookie (`HttpOnly; Secure; SameSite=Strict`,
  `__Host-` prefixed), every state-changing request carries a CSRF token (`csrf`), and every
  response carries a strict Content-Security-Policy (`app`);
- agent names, host names, versions, profile names and health messages come from agents and are
  treated as hostile: only ever rendered as escaped text (`render`).
"""

from onprem.control_plane.console.listener import Console, ConsoleConfig

__all__ = ["Console", "ConsoleConfig"]
