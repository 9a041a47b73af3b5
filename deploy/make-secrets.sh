#!/bin/sh
# Writes .env with random credentials (once) and the mosquitto password file for the user "gateway".
# Run from the repository root: deploy/make-secrets.sh
set -eu
cd "$(dirname "$0")/.."
rand() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }
if [ ! -f .env ]; then
  sed -e "s/^MQTT_PASSWORD=.*/MQTT_PASSWORD=$(rand)/" \
      -e "s/^INFLUX_ADMIN_PASSWORD=.*/INFLUX_ADMIN_PASSWORD=$(rand)/" \
      -e "s/^INFLUX_TOKEN=.*/INFLUX_TOKEN=$(rand)$(rand)/" \
      -e "s/^GRAFANA_ADMIN_PASSWORD=.*/GRAFANA_ADMIN_PASSWORD=$(rand)/" .env.example > .env
  chmod 600 .env
  echo "wrote .env (edit SITE, TZ and the device paths)"
fi
. ./.env
if command -v mosquitto_passwd >/dev/null 2>&1; then
  mosquitto_passwd -c -b deploy/mosquitto/passwd gateway "$MQTT_PASSWORD"
else
  docker run --rm -v "$PWD/deploy/mosquitto:/m" eclipse-mosquitto:2.0.20 \
    mosquitto_passwd -c -b /m/passwd gateway "$MQTT_PASSWORD"
fi
chmod 644 deploy/mosquitto/passwd
echo "wrote deploy/mosquitto/passwd (user: gateway)"
