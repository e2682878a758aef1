"""Errors a user can act on. Each names what is wrong and where."""

import logging
import re


class DaybreakError(Exception):
    """Base class: the CLI prints these without a traceback.

    Most are about the input or the state of the registry, so retrying cannot help; subclasses
    for passing conditions set ``retryable``.
    """

    retryable: bool = False


RAY_IMPORT_FAILED = "The remote function failed to import on the worker"


def is_retryable(exc: BaseException) -> bool:
    """Whether an orchestrator should retry a step that raised `exc`.

    daybreak's own errors say so themselves; anything else (network, a lost Ray worker, a
    restarting MLflow server) may pass, and steps are idempotent, so a retry is safe.
    """
    root = _raised_in_task(exc)
    if root is not exc and not is_retryable(root):
        return False
    if isinstance(exc, DaybreakError):
        return exc.retryable
    if isinstance(exc, RuntimeError) and str(exc).startswith(RAY_IMPORT_FAILED):
        return False  # the code is not on the node (a RuntimeError is all Ray raises for it)
    if credentials_refused(exc) or _registry_says_no(exc):  # the same answer again next time
        return False
    # Bad arguments or data, programming errors, and files that are not there (a path only the
    # driver's disk has, read on a Ray worker): the same again next time.
    if isinstance(exc, (ValueError, TypeError, LookupError, AttributeError, NameError, AssertionError,
                        NotImplementedError, RecursionError, ImportError, ArithmeticError, SyntaxError,
                        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, Exception)


def _raised_in_task(exc: BaseException) -> BaseException:
    """The error a Ray task or a Ray Data operator raised, under Ray's wrappers (``RayTaskError``,
    ``UserCodeException``); `exc` itself when it is not one of those."""
    seen: set[int] = set()
    while type(exc).__module__.startswith("ray.") and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            inner = exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


# MLflow's answers that will not change on retry: what is asked for is not there, or the request
# is wrong. (Its server errors, rate limits and connection failures stay retryable.)
_MLFLOW_PERMANENT = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST",
                     "ENDPOINT_NOT_FOUND")


def _registry_says_no(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("mlflow") and getattr(exc, "error_code", None) in _MLFLOW_PERMANENT


def credentials_refused(exc: BaseException) -> str | None:
    """MLflow's error code when `exc` is a tracking server refusing the credentials (HTTP 401 or
    403), else None."""
    code = getattr(exc, "error_code", None)
    if type(exc).__module__.startswith("mlflow") and code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return code
    return None


class SpecError(DaybreakError):
    """The spec is invalid; raised before any work starts."""


class ContractError(DaybreakError):
    """Input data breaks the source contract; nothing was published."""


class MissingInputError(DaybreakError):
    """Data the step needs is not there (no landing file, no staged partition, no features)."""


class GateError(DaybreakError):
    """The gate could not reach a decision (e.g. too few holdout rows)."""


class PromotionConflict(DaybreakError):
    """The champion moved since the gate evaluated against it."""


class IntegrityError(DaybreakError, ValueError):
    """A model version's stored code or artifacts are not the bytes training recorded."""


class ApprovalError(DaybreakError):
    """A version cannot be approved or rejected in the state it is in (not pending, deleted, ...)."""


# Greedy to the last '@' before the path: a password may hold a raw '@' (urllib and SQLAlchemy
# take the last one as the end of the user info).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"]*)@")


def redact(text: object) -> str:
    """`text` with the user:password part of every URI in it replaced by ``***``
    (``https://bob:secret@mlflow:5000`` -> ``https://***@mlflow:5000``): credentials never reach a
    message, a log line or ``/health``."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


class RedactFilter(logging.Filter):
    """A handler filter that passes every record through ``redact`` (message, arguments and any
    traceback): set on the CLI's and the server's log handlers, it covers MLflow's and Ray's
    records as well as daybreak's."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
