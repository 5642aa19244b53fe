"""Errors of scribe-events. Each maps to one HTTP status and one contract error code.

    ScribeEventsError                  500 internal_error
    ├── BadRequest                     400 bad_request
    │   └── InvalidJSON                400 invalid_json
    ├── Unauthorized                   401 unauthorized        (no credentials)
    │   └── InvalidToken               401 invalid_token       (bad, expired, wrong aud/iss, bad ticket)
    ├── Forbidden                      403 forbidden
    ├── NotFound                       404 not_found
    ├── RequestTimeout                 408 request_timeout
    ├── Conflict                       409 conflict
    ├── PayloadTooLarge                413 payload_too_large
    ├── ValidationFailed               422 validation_error    (names the field)
    │   └── StoreRejected              422 store_rejected      (the store refused these rows: a retry
    │                                                            cannot help; other rows are unaffected)
    ├── RateLimited                    429 rate_limited        (carries Retry-After)
    └── ServiceUnavailable             503 unavailable         (retry later; carries Retry-After)
        ├── StoreUnavailable           503 store_unavailable   (the store cannot be reached: retry)
        ├── BrokerUnavailable          503 broker_unavailable  (Redis cannot be reached)
        ├── ShuttingDown               503 shutting_down
        └── NotReady                   503 not_ready           (starting, or not accepting events)

Control flow branches on these classes, never on a code string. Third-party errors are mapped at
the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class ScribeEventsError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # Finer than the code, for metrics only (e.g. an invalid_token that has expired).
        self.reason = reason or self.code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ScribeEventsError):
    status = 400
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class Unauthorized(ScribeEventsError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class InvalidToken(Unauthorized):
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Forbidden(ScribeEventsError):
    status = 403
    code = "forbidden"


class NotFound(ScribeEventsError):
    status = 404
    code = "not_found"


class RequestTimeout(ScribeEventsError):
    status = 408
    code = "request_timeout"


class Conflict(ScribeEventsError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ScribeEventsError):
    status = 413
    code = "payload_too_large"


class ValidationFailed(ScribeEventsError):
    status = 422
    code = "validation_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message, code=code)
        self.field = field


class StoreRejected(ValidationFailed):
    """The store refused a row (a constraint, a value it cannot hold). Retrying the same rows cannot
    succeed, so the publisher isolates them: the other jobs of the batch are stored."""

    code = "store_rejected"


class RateLimited(ScribeEventsError):
    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after_s: int = 1, code: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ServiceUnavailable(ScribeEventsError):
    status = 503
    code = "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class StoreUnavailable(ServiceUnavailable):
    code = "store_unavailable"


class BrokerUnavailable(ServiceUnavailable):
    code = "broker_unavailable"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class NotReady(ServiceUnavailable):
    code = "not_ready"
