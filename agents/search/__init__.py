"""The raw search server that BB3's search module talks to (ParlAI's "raw search server").

`index` builds a SQLite FTS5 index from local files, `backends` answers queries from it or
forwards them to a real web search, `server` speaks ParlAI's protocol over HTTP, and `client`
is the agent's side of that protocol.
"""
