"""opt-serve: the completions server.

``schema`` (the wire format, parsed once) and ``scheduler`` (the continuous-batching policy)
need no model; the engine's step function runs the model on each step's plan.
"""
