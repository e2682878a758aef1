"""Errors a user can act on. Each names what is wrong and where."""


class DaybreakError(Exception):
    """Base class: the CLI prints these without a traceback.

    Most are about the input or the state of the registry, so retrying cannot help; subclasses
    for passing conditions set ``retryable``.
    """

    retryable: bool = False


def is_retryable(exc: BaseException) -> bool:
    """Whether an orchestrator should retry a step that raised `exc`.

    daybreak's own errors say so themselves; anything else (network, a lost Ray worker, a
    restarting MLflow server) may pass, and steps are idempotent, so a retry is safe.
    """
    if isinstance(exc, DaybreakError):
        return exc.retryable
    if isinstance(exc, (ValueError, TypeError, KeyError)):  # bad arguments or data: same again next time
        return False
    return isinstance(exc, Exception)


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


class ApprovalError(DaybreakError):
    """A version cannot be approved or rejected in the state it is in (not pending, deleted, ...)."""
