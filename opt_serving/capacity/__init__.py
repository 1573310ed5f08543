"""``opt-capacity``: will a model fit, on how many GPUs, how fast. ``planner`` is the arithmetic
(pure functions of a config and a GPU), ``gpus`` the catalogue, ``cli`` the command."""
