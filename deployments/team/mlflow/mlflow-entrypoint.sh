#!/bin/sh
# Writes MLflow's basic-auth config from the environment, then runs the command (compose.yaml: `mlflow
# server --app-name basic-auth …`). The config names the auth database, whose URL holds a password, so it
# is made here, readable by this user only, and is in no file of the repository or image.
#
#   MLFLOW_AUTH_DATABASE_URI     postgresql://USER:PASSWORD@HOST:PORT/DB of the users and permissions
#   MLFLOW_AUTH_ADMIN_USERNAME   the admin MLflow creates on first start (MLflow reads it, and
#   MLFLOW_AUTH_ADMIN_PASSWORD   the password, from the environment itself)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  READ (MLflow's default): what users get on experiments not their own
#
# MLflow reads the rest itself: MLFLOW_BACKEND_STORE_URI (--backend-store-uri),
# MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_SERVER_ALLOWED_HOSTS.
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?set it (compose.yaml builds it from MLFLOW_DB_PASSWORD in .env)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_ADMIN_USER in deployments/team/.env}"

umask 077
config_dir="$(mktemp -d)"
# Passwords in the URL must not contain '%' (configparser would read it as interpolation): use URL-safe
# ones, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))'.
cat >"$config_dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
exec "$@"
