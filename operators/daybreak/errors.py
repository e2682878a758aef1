"""Errors a user can act on. Each names what is wrong and where."""


class DaybreakError(Exception):
    """Base class: the CLI prints these without a traceback."""


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
