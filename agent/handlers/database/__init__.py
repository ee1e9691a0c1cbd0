"""The database handler: SQL against the agent's database profiles, streamed as typed, columnar results.

`handler` runs the requests; each blocking step runs in the profile's thread
pool. The pieces: `engine` (a profile's engine, threads and connection slots;
one request's connection), `statements` (SQL parsed and compiled once),
`query` (a streamed statement), `operations`
(batch, transaction, change poll), `values` (types), `errors` (error
mapping), `odbc` (ODBC profiles: connection strings and the generic dialect),
`checks` (what `test-profile` reports), `guard` (how read-only profiles stay
read-only, and how connections are reset).
"""

from onprem.agent.handlers.database.handler import DatabaseHandler

__all__ = ["DatabaseHandler"]
