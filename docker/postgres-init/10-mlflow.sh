#!/bin/sh
# Runs once, when the Postgres volume is created: a database for MLflow next to Airflow's.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE ${MLFLOW_DB:-mlflow} OWNER \"$POSTGRES_USER\";"
