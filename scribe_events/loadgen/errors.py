"""Errors of the load generator (client side: they map to exit codes, not to HTTP statuses).

LoadgenError        the run could not happen or finish (server unreachable, nobody connected)
└── BadInput        the request itself is wrong (a template, a bound, a URL): exit code 2
"""

from __future__ import annotations


class LoadgenError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(LoadgenError):
    pass
