"""``opt-demo``: the toolkit end to end (reshard, serve, chat). It sits above ``opt_serving``,
``reshard`` and ``agents``, which do not import each other's commands."""
