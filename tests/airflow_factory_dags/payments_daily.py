"""A user's DAG file: the daily cycle of another spec, in two lines (tests/test_airflow.py)."""
from daybreak.airflow import daily_retrain_dag

daily_retrain_dag("specs/payments.yaml", dag_id="payments_daily_retrain")
