"""Step 1, stage: raw landing files -> validated, atomically published Parquet partitions.
"""

from daybreak.stage._staging import SourceResult, StageResult, recorded_lineage, stage, unlanded

__all__ = ["SourceResult", "StageResult", "recorded_lineage", "stage", "unlanded"]
