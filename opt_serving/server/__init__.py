"""opt-serve's HTTP layer, over the runtime's engine: ``routes`` (one function per route, and
the table the app and ``--help`` share), ``app`` (wiring, auth, errors as JSON), ``service``
(what the routes share), ``wsgi`` (waitress, hardened), ``metrics`` (Prometheus), ``serve``
(start-up through ``runtime.startup``, then HTTP) and ``cli``.
"""
