"""The Assets the daybreak DAGs produce, with stable names and URIs.

``STAGED``, ``FEATURES`` and ``PREDICTIONS`` are partitioned by date (Airflow 3.2+ partitioned
assets): each time their task succeeds they get an event whose ``partition_key`` is the date it
processed (``YYYY-MM-DD``; the extra repeats it with the step and the rows). A DAG scheduled with
``PartitionedAssetTimetable(assets=FEATURES)`` gets one run per date, whose ``partition_key`` is
that date, as ``daybreak_partition_score`` does. (A DAG with a plain asset schedule is not queued by
a partitioned event: schedule on them with a ``PartitionedAssetTimetable``.)

``CHAMPION`` gets an event only when the champion alias actually moves (a promotion, or an
approval): a task cannot hold back the event of a declared outlet Asset, so promote and approve
declare the alias ``CHAMPION_CHANGES`` and attach a ``CHAMPION`` event to it when they move it
(extra: version, previous_version, date, model). Schedule on ``CHAMPION`` to follow promotions,
as ``daybreak_batch_score`` does. It is not partitioned: events through an alias carry only the
DAG run's partition key, which a ``@daily`` run has none of.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

STAGED = Asset(name="daybreak.staged", uri="x-daybreak://staged", group="daybreak")
FEATURES = Asset(name="daybreak.features", uri="x-daybreak://features", group="daybreak")
PREDICTIONS = Asset(name="daybreak.predictions", uri="x-daybreak://predictions", group="daybreak")
CHAMPION = Asset(name="daybreak.champion", uri="x-daybreak://champion", group="daybreak")
CHAMPION_CHANGES = AssetAlias(name="daybreak.champion.changes", group="daybreak")
