"""Step 1, stage: raw landing files -> validated, atomically published Parquet partitions.
"""

from daybreak.stage._staging import recorded_lineage, stage

__all__ = ["recorded_lineage", "stage"]
