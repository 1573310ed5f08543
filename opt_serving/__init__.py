"""OPT / BlenderBot-3 serving: ``from opt_serving import LLM`` for offline generation.

``LLM`` is imported on first use, so that ``import opt_serving.config`` (the resharder, the
capacity planner) does not load the HTTP server it shares the engine with."""


def __getattr__(name: str):
    if name in ("LLM", "Completion"):
        from . import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'opt_serving' has no attribute {name!r}")
