#!/bin/sh
# The team profile's databases, made once when PostgreSQL starts on an empty volume (the official image
# runs /docker-entrypoint-initdb.d/* then; never again): a role and a database for Prefect, a role for
# MLflow owning its tracking database and its basic-auth user database.
#
#   prefect       Prefect's API servers and services (PREFECT_API_DATABASE_CONNECTION_URL)
#   mlflow        MLflow runs, metrics, params, tags, model registry (--backend-store-uri)
#   mlflow_auth   MLflow's basic-auth users and permissions (database_uri of its auth config)
#
# The passwords come from the environment (compose.yaml passes them from .env); psql's \getenv reads them,
# so they are on no command line. Changing them later: docs/team.md, "Rotating credentials".
set -eu
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD in deployments/team/.env}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in deployments/team/.env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv prefect_password PREFECT_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
-- Prefect's migrations create pg_trgm (trusted, so its owner could too); made here so they need no privilege.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
