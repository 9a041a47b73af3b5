#!/bin/sh
# Runs once, when influxdb:2.x initialises its volume. Dashboards query with InfluxQL, which InfluxDB 2 answers
# through a DBRP mapping: database "infusion" -> the "infusion" bucket.
set -eu
bucket_id=$(influx bucket list --name infusion --org "$DOCKER_INFLUXDB_INIT_ORG" --hide-headers | cut -f1)
influx v1 dbrp create --db infusion --rp autogen --bucket-id "$bucket_id" --default --org "$DOCKER_INFLUXDB_INIT_ORG"
