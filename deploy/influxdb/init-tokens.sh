#!/bin/sh
# Runs once, as root, when influxdb:2.x initialises its volume (after init-dbrp.sh), with the admin token in the
# influx CLI's config: one token per role, least privilege, each written to the site's tokens folder
# (/etc/infusion-telemetry/tokens, mounted at /infusion/tokens), mode 0600, owned by the service that reads it:
#   gateways.token  write the bucket, nothing else: every room PC's gateway (deploy/make-secrets.sh room)
#   grafana.token   read the bucket and its DBRP mapping (InfluxQL), nothing else: Grafana's datasource
# The admin token stays with the administrator (backups, the influx CLI). A token is printed by `influx auth create`
# and read from its output here: no token is ever on a command line.
set -eu
umask 077
tokens=/infusion/tokens
org=$DOCKER_INFLUXDB_INIT_ORG
bucket=$DOCKER_INFLUXDB_INIT_BUCKET_ID

make_token() {  # make_token NAME OWNER PERMISSION-FLAGS...
  name=$1 owner=$2
  shift 2
  influx auth create --org "$org" --description "infusion-telemetry $name" --json "$@" \
    | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' > "$tokens/$name.token.new"
  if [ ! -s "$tokens/$name.token.new" ]; then
    echo "init-tokens: influx auth create gave no token for $name" >&2
    exit 1
  fi
  chown "$owner" "$tokens/$name.token.new"
  chmod 600 "$tokens/$name.token.new"
  mv -f "$tokens/$name.token.new" "$tokens/$name.token"
  echo "init-tokens: wrote $tokens/$name.token"
}

make_token gateways 10001:10001 --write-bucket "$bucket"
make_token grafana 472:0 --read-bucket "$bucket" --read-dbrps
