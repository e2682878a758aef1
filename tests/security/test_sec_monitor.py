"""Attack: forged prediction-log rows drive the monitor (issue 20, medium).

On the code before this fix, an anonymous request carrying the identity columns of a real past
row was logged under that identity (closed at the server: identities need the token, see
test_sec_server.py), and the monitor joined labels on the identity keeping the *last* duplicate,
so forged rows replaced real ones in the live metrics that decide an automatic rollback. Here the
monitor's join runs on a real feature partition (the labels) and a real prediction log written by
``PredictionLog``: identities logged with different inputs or predictions are left out and
counted; a client's plain retry (the same row again) still counts once.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from daybreak.deploy import read_log
from daybreak.deploy._predlog import PredictionLog
from daybreak.features import read_features
from daybreak.infra.context import RunContext
from daybreak.monitor._monitor import joined_rows


def _log(spec, ctx, frame, preds, version="1") -> None:
    plog = PredictionLog(spec, ctx.store)
    ids = {c: frame[c].astype(str).tolist() for c in spec.id_columns()}
    names = spec.features.feature_names()
    plog.record(version, frame[names].reset_index(drop=True), np.asarray(preds, np.float64),
                [("r", len(frame), ids)])
    plog.close()


def test_forged_duplicates_are_left_out_and_retries_count_once(fresh: Path, spec) -> None:
    ctx = RunContext.create("2013-01-02")
    t, _, _ = read_features(spec, ctx, [ctx.logical_date])
    labelled = t.to_pandas()
    real = labelled.head(200).copy()
    honest = np.full(len(real), 0.2)
    _log(spec, ctx, real, honest)  # what the champion really answered
    _log(spec, ctx, real.head(20), honest[:20])  # a client's retry of 20 rows: the same again
    forged = real.iloc[20:60].copy()
    forged["distance"] = forged["distance"] + 1000  # other inputs under 40 real identities
    _log(spec, ctx, forged, np.full(len(forged), 0.99))  # answered by the same version
    deadline = time.monotonic() + 30
    while (logged := read_log(spec, ctx.store, [ctx.logical_date])) is None or logged.num_rows < 260:
        assert time.monotonic() < deadline, "the log was not written"
        time.sleep(0.1)
    rows = joined_rows(spec, ctx, labelled, logged.to_pandas(), None)
    assert rows.attrs.get("conflicting_identities") == 40
    assert len(rows) == 160, len(rows)  # the 40 forged identities out, the 20 retried once each
    assert (rows["prediction"] == 0.2).all(), "a forged prediction was judged"
