"""Step 3, monitor: the served model's live quality on the day's labels; rolls back a champion that fell.
"""

from daybreak.monitor._monitor import MonitorResult, live_history, monitor_model

__all__ = ["MonitorResult", "live_history", "monitor_model"]
