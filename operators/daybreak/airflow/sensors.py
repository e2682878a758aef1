"""``LandingFileSensor``: wait for a day's landing files instead of failing the stage task and retrying.

Put it before ``stage``: it succeeds once every source the spec expects on the date has its
landing file (``sources.<name>.path`` with ``{date}``, in the store: a folder or S3), or already
has a staged partition. A source its calendar does not expect that day is not waited for.
Deferrable (the default): after one look it waits in Airflow's triggerer
(:class:`~daybreak.airflow.triggers.LandingFileTrigger` lists the store every ``poke_interval``),
holding no worker slot; ``deferrable=False`` pokes like a classic sensor (``mode`` poke or
reschedule). ``timeout`` (default 12 hours) bounds the wait either way; ``soft_fail`` skips instead
of failing then.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator

from daybreak.airflow.operators import default_deferrable, partition_date, storage_options


class LandingFileSensor(BaseSensorOperator):
    """Wait for the landing files of a date (see the module docstring).

    :param spec: path (or s3:// URI) of the pipeline spec (templated).
    :param sources: the sources to wait for (default: every source of the spec).
    :param logical_date: the date, YYYY-MM-DD (templated); empty: the run's partition key (a
        date), else its logical date.
    :param store: store root; default ``$DAYBREAK_STORE`` / ``$DAYBREAK_HOME/store``.
    :param aws_conn_id: Airflow Connection with S3 credentials (see ``daybreak.airflow.hooks``),
        read in the worker and in the triggerer.
    :param deferrable: wait in the triggerer; None: True unless
        ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE`` is false.
    :param poke_interval: seconds between two looks (default 60).
    :param timeout: how long to wait in all (default 12 hours).

    Its XCom: the landing files found, by source.
    """

    template_fields: Sequence[str] = ("spec", "logical_date", "store", "aws_conn_id", "sources")
    ui_color = "#e3f1d4"

    def __init__(self, *, spec: str, sources: Sequence[str] | None = None, logical_date: str | None = None,
                 store: str | None = None, aws_conn_id: str | None = None, deferrable: bool | None = None,
                 poke_interval: timedelta | float = 60, timeout: timedelta | float = timedelta(hours=12),
                 **kwargs: Any) -> None:
        super().__init__(poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.spec = spec
        self.sources = list(sources) if sources else None
        self.logical_date = logical_date
        self.store = store
        self.aws_conn_id = aws_conn_id
        self.deferrable = default_deferrable() if deferrable is None else deferrable

    def _look(self, context: Any) -> tuple[dict[str, str], dict[str, list[str]], str]:
        """(missing source -> its landing path for the date, present source -> its landing files,
        the store root). A source with a staged partition but no landing file counts as present."""
        from airflow.sdk.exceptions import AirflowFailException

        from daybreak.stage import unlanded
        from daybreak.steps import resolve_date, spec_and_context

        day = resolve_date(self.logical_date, partition_date(context), context.get("logical_date"))
        spec, ctx = spec_and_context(self.spec, day, store=self.store, storage=storage_options(self.aws_conn_id))
        wanted = self.sources or list(spec.sources)
        unknown = [name for name in wanted if name not in spec.sources]
        if unknown:
            raise AirflowFailException(f"sources {unknown} are not in the spec (its sources: {sorted(spec.sources)})")
        absent = set(unlanded(spec, ctx))
        paths = {name: spec.sources[name].path.replace("{date}", day.isoformat()) for name in wanted}
        missing = {name: path for name, path in paths.items() if name in absent}
        found = {}
        for name, path in paths.items():
            if name not in absent:
                fs, infos = ctx.store.glob(path)
                found[name] = [f"s3://{i.path}" if fs.type_name == "s3" else i.path for i in infos]
        return missing, found, ctx.store.uri(ctx.store.base)

    def poke(self, context: Any) -> Any:
        from airflow.sdk import PokeReturnValue

        missing, found, _ = self._look(context)
        if missing:
            self.log.info("waiting for landing files: %s", missing)
            return False
        return PokeReturnValue(is_done=True, xcom_value=found)

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        missing, found, store = self._look(context)
        if not missing:
            return found
        from daybreak.airflow.triggers import LandingFileTrigger

        self.log.info("waiting in the triggerer for landing files: %s", missing)
        self.defer(trigger=LandingFileTrigger(store=store, patterns=sorted(set(missing.values())),
                                              aws_conn_id=self.aws_conn_id, poll_interval=self.poke_interval),
                   method_name="execute_complete", timeout=timedelta(seconds=self.timeout))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        """The trigger saw the files: look once more (the definitive check) and succeed, or wait again."""
        missing, found, _ = self._look(context)
        if not missing:
            return found
        return self.execute(context)  # gone again, or a source not seen by the trigger: wait again

