"""The one error type for unusable checkpoint input: what is wrong, with which file, and the fix."""

from __future__ import annotations


class CheckpointError(Exception):
    def __init__(self, path: str, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path} {problem}. {fix[0].upper()}{fix[1:]}.")
