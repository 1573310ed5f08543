"""Reading, writing and interpreting metaseq checkpoint files (safely, and lazily)."""
