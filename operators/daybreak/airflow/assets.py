"""The Assets the daybreak DAGs produce, with stable names and URIs.

``STAGED`` and ``FEATURES`` get an event each time their task succeeds (extra: date, rows).
``CHAMPION`` gets an event only when the champion alias actually moves (a promotion, or an
approval): a task cannot hold back the event of a declared outlet Asset, so promote and approve
declare the alias ``CHAMPION_CHANGES`` and attach a ``CHAMPION`` event to it when they move it
(extra: version, previous_version, date, model). Schedule on ``CHAMPION`` to follow promotions,
as ``daybreak_batch_score`` does.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias

STAGED = Asset(name="daybreak.staged", uri="x-daybreak://staged", group="daybreak")
FEATURES = Asset(name="daybreak.features", uri="x-daybreak://features", group="daybreak")
CHAMPION = Asset(name="daybreak.champion", uri="x-daybreak://champion", group="daybreak")
CHAMPION_CHANGES = AssetAlias(name="daybreak.champion.changes", group="daybreak")
