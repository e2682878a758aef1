"""Step 2, features: staged partitions -> point-in-time correct features, built on Ray.
"""

from daybreak.features._build import (
    DAY,
    EVENT_TIME,
    FeaturesResult,
    build_features,
    day_slices,
    feature_zone,
    leak_suspects,
    read_features,
    recorded_lineage,
    write_sorted,
)
from daybreak.features._maturity import mature_frame, mature_rows

__all__ = [
    "DAY",
    "EVENT_TIME",
    "FeaturesResult",
    "build_features",
    "day_slices",
    "feature_zone",
    "leak_suspects",
    "mature_frame",
    "mature_rows",
    "read_features",
    "recorded_lineage",
    "write_sorted",
]
