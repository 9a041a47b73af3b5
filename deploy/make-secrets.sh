#!/bin/sh
# Site settings, secrets and certificates for the two compose roles (docs/deploy.md), all outside the repository so
# that `git pull` never touches them. Run as root on the central server.
#
#   deploy/make-secrets.sh central [--dir DIR] [--site SITE] [--server-name NAME]... [--bind ADDRESS]
#                                  [--gateway ID]... [--readers N] [--nurse-stations N] [--prefix PREFIX]
#                                  [--simulated] [--owners none]
#   deploy/make-secrets.sh room --gateway ID [--dir DIR] [--bundle FILE] [--owners none]
#
# central: writes (or completes) the site folder DIR (default /etc/infusion-telemetry):
#   compose.env            settings for docker compose, no secret in it (COMPOSE_FILE=docker-compose.yml, SITE, the
#                          server's names, BIND_ADDRESS); written once, edit it afterwards
#   accounts.conf          the accounts of the last run (gateways, readers, nurse stations, simulated)
#   passwords.env          every generated password (0600 root): kept across runs, a new one for each new account
#   tls/ca.key, ca.crt     a small clinic CA (10 years), created once; ca.crt goes to every room PC and screen
#   mosquitto/             passwd (hashed), acl, server.crt/key, ca.crt, health/mosquitto_sub (the health check's
#                          login, read from a file): owned by the broker's user 1883
#   influxdb/              admin-password, admin-token (root: the image's entrypoint reads them before dropping
#                          root), tls.crt/key (owned by influxd's user 1000)
#   grafana/               admin-password, tls.crt/key (owned by Grafana's user 472)
#   tokens/                filled by InfluxDB at its first start (deploy/influxdb/init-tokens.sh): gateways.token
#                          (write-only, owned by the gateway's user 10001), grafana.token (read-only, owned by 472)
#   gateway-sim/           with --simulated: the simulated gateway's MQTT password (owned by 10001)
#   dashboards/            the generated dashboards Grafana shows (a copy of the shipped ones the first time)
#   Every secret file is mode 0600 and owned by the service that reads it; the server certificates (2 years) are
#   issued again on every run, for the names given with --server-name (repeatable; the first is the name room PCs
#   use) plus the service's compose name and localhost (the health checks). Passwords never appear on a command line:
#   mosquitto_passwd reads them from stdin, the rest is written by the shell's printf.
#   The broker accounts (one each, the client id is the account: docs/deploy.md, "Broker accounts and ACL"):
#     gateway-<id>       one per room PC (--gateway, the room PC's host name): reads and writes its site
#     reader-<n>         screens, watch terminals, integrations: read the site
#     nurse-station-<n>  room and device commands only; read the site
#     health             the broker's health check: $SYS/broker/uptime only
#   Without --gateway/--readers/--nurse-stations/--simulated, the accounts of the last run are kept; with them, the
#   accounts are exactly those given (passwd and acl are rewritten whole: an account no longer given is gone).
#
# room: on the central server, after its first start, a bundle for one room PC (--bundle, default ./room-<ID>.tar,
#   mode 0600) to unpack as root into the room PC's /etc/infusion-telemetry (`tar -xpf FILE -C DIR`): compose.env
#   (COMPOSE_FILE=docker-compose.room.yml, GATEWAY_ID, SITE, CENTRAL_HOST), gateway.toml (the template deploy/gateway.toml),
#   tls/ca.crt and secrets/mqtt-password, secrets/influx-token (0600, owned by the gateway's user 10001).
#
# --owners none leaves every file to the caller (tests, or a broker running as the caller); otherwise run as root.
set -eu
start=$(pwd)
cd "$(dirname "$0")/.."
repo=$(pwd)
umask 077

die() { echo "make-secrets: $*" >&2; exit 2; }
abspath() { case $1 in /*) echo "$1" ;; *) echo "$start/$1" ;; esac; }
rand() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }
name_ok() { printf '%s' "$1" | grep -Eq '^[a-z0-9][a-z0-9_-]{0,31}$'; }
count_ok() { printf '%s' "$1" | grep -Eq '^[0-9]{1,2}$'; }
key_of() { printf 'MQTT_PASSWORD_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"; }

MOSQUITTO_UID=1883 INFLUXDB_UID=1000 GRAFANA_UID=472 GATEWAY_UID=10001

[ $# -ge 1 ] || die "give a role: central or room (see the comment at the top of $0)"
role=$1
shift
case $role in central|room) ;; *) die "unknown role '$role': central or room" ;; esac

dir=/etc/infusion-telemetry site="" prefix="" bind="" names="" gateways="" readers="" nurses="" simulated=""
owners=root bundle=""
while [ $# -gt 0 ]; do
  case $1 in
    --simulated) simulated=yes; shift; continue ;;
  esac
  [ $# -ge 2 ] || die "$1 needs a value"
  case $1 in
    --dir) dir=$(abspath "$2") ;;
    --site) site=$2 ;;
    --prefix) prefix=$2 ;;
    --bind) bind=$2 ;;
    --server-name) names="$names $2" ;;
    --gateway) gateways="$gateways $2" ;;
    --readers) readers=$2 ;;
    --nurse-stations) nurses=$2 ;;
    --owners) owners=$2 ;;
    --bundle) bundle=$(abspath "$2") ;;
    *) die "unknown option $1 (see the comment at the top of $0)" ;;
  esac
  shift 2
done
case $owners in
  none) ;;
  root) [ "$(id -u)" = 0 ] || die "run me as root (the files belong to the services' users), or --owners none" ;;
  *) die "--owners takes only 'none'" ;;
esac

give() {  # give OWNER MODE FILE...: each file to the service that reads it
  owner=$1 mode=$2
  shift 2
  chmod "$mode" "$@"
  if [ "$owners" != none ]; then chown "$owner" "$@"; fi
}
folder() { (umask 022 && mkdir -p "$@"); }  # 0755: each service must be able to enter its own

# --- room: a bundle for one room PC --------------------------------------------------------------------------------

if [ "$role" = room ]; then
  set -- $gateways
  [ $# = 1 ] || die "room needs exactly one --gateway ID (the room PC's host name)"
  id=$1
  [ -f "$dir/compose.env" ] && [ -f "$dir/passwords.env" ] || die "no central site in $dir: run '$0 central' first"
  . "$dir/compose.env"
  . "$dir/passwords.env"
  key=$(key_of "gateway-$id")
  eval "password=\${$key:-}"
  [ -n "$password" ] || die "gateway '$id' has no account: run '$0 central --gateway $id ...' (with every gateway)"
  [ -s "$dir/tokens/gateways.token" ] || die "no $dir/tokens/gateways.token yet: start the central role once \
(docker compose up -d): InfluxDB writes the gateways' token at its first start"
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  folder "$stage/tls" "$stage/secrets"
  cp "$dir/tls/ca.crt" "$stage/tls/ca.crt"
  cp "$repo/deploy/gateway.toml" "$stage/gateway.toml"
  {
    echo "# Room PC $id of site $SITE (deploy/make-secrets.sh room). docs/deploy.md, \"A room PC\"."
    echo "# The role's compose file; a site's own override goes after it, in this folder (docs/deploy.md, \"Upgrades\"):"
    echo "# COMPOSE_FILE=docker-compose.room.yml:/etc/infusion-telemetry/compose.override.yml"
    echo "COMPOSE_FILE=docker-compose.room.yml"
    echo "SITE=$SITE"
    echo "GATEWAY_ID=$id"
    echo "CENTRAL_HOST=$SERVER_NAME"
    echo "INFLUX_ORG=$INFLUX_ORG"
    echo "TZ=$TZ"
    echo "SITE_DIR=/etc/infusion-telemetry"
  } > "$stage/compose.env"
  printf '%s\n' "$password" > "$stage/secrets/mqtt-password"
  cp "$dir/tokens/gateways.token" "$stage/secrets/influx-token"
  give 0:0 644 "$stage/tls/ca.crt" "$stage/gateway.toml" "$stage/compose.env"
  give "$GATEWAY_UID:$GATEWAY_UID" 600 "$stage/secrets/mqtt-password" "$stage/secrets/influx-token"
  [ -n "$bundle" ] || bundle="$start/room-$id.tar"
  tar --numeric-owner -C "$stage" -cf "$bundle" compose.env gateway.toml tls secrets
  chmod 600 "$bundle"
  echo "wrote $bundle for room PC $id: copy it there and unpack as root into /etc/infusion-telemetry (docs/deploy.md)"
  exit 0
fi

# --- central: settings ---------------------------------------------------------------------------------------------

folder "$dir"
if [ -f "$dir/compose.env" ]; then
  . "$dir/compose.env"
  [ -z "$site" ] || [ "$site" = "$SITE" ] || die "$dir/compose.env is for site $SITE, not $site: edit it there"
  site=$SITE
  [ -z "$names" ] || [ "$(echo $names)" = "$(echo $SERVER_NAMES)" ] || die "the server names are SERVER_NAMES in \
$dir/compose.env: edit them there (SERVER_NAME first), then run me again without --server-name"
  [ -z "$bind" ] || [ "$bind" = "$BIND_ADDRESS" ] || die "the address is BIND_ADDRESS in $dir/compose.env: edit it there"
  names=$SERVER_NAMES
else
  [ -n "$site" ] || die "give --site SITE (lower-case letters, digits, - and _)"
  name_ok "$site" || die "site '$site' is not a valid name (lower-case letters, digits, - and _)"
  [ -n "$names" ] || names=$(hostname -f 2>/dev/null || hostname)
  names=$(echo $names)
  [ -n "$bind" ] || die "give --bind ADDRESS: the central server's address on the clinic network (its ports listen there)"
  set -- $names
  {
    echo "# The central server of site $site (deploy/make-secrets.sh central). No secret here: they are files in this"
    echo "# folder. docker compose --env-file $dir/compose.env up -d   (docs/deploy.md, \"The central server\")"
    echo "# The role's compose file; a site's own override goes after it, in this folder (docs/deploy.md, \"Upgrades\"):"
    echo "# COMPOSE_FILE=docker-compose.yml:$dir/compose.override.yml"
    echo "COMPOSE_FILE=docker-compose.yml"
    echo "# \"simulated\" adds two simulated rooms and their gateway (a trial; make-secrets.sh central --simulated)"
    echo "COMPOSE_PROFILES=${simulated:+simulated}"
    echo "SITE=$site"
    echo "# The name room PCs and screens use for this server (its certificates carry every name of SERVER_NAMES)."
    echo "SERVER_NAME=$1"
    echo "SERVER_NAMES=\"$names\""
    echo "# The address the broker (8883), InfluxDB (8086) and Grafana (3000) listen on: the clinic network's, never 0.0.0.0"
    echo "# on a server that also faces another network."
    echo "BIND_ADDRESS=$bind"
    echo "INFLUX_ORG=clinic"
    echo "TZ=UTC"
    echo "SITE_DIR=$dir"
    echo "DASHBOARDS_DIR=$dir/dashboards"
  } > "$dir/compose.env"
  chmod 644 "$dir/compose.env"
  echo "wrote $dir/compose.env (check TZ)"
  . "$dir/compose.env"
fi
for name in $names; do
  printf '%s' "$name" | grep -Eq '^[A-Za-z0-9.-]+$' || die "server name '$name' is not a host name or an IPv4 address"
done

# The accounts: those given now, else those of the last run.
if [ -f "$dir/accounts.conf" ]; then . "$dir/accounts.conf"; fi
[ -n "$gateways" ] || gateways=${GATEWAYS:-}
[ -n "$readers" ] || readers=${READERS:-1}
[ -n "$nurses" ] || nurses=${NURSES:-1}
[ -n "$simulated" ] || simulated=${SIMULATED:-}
[ -n "$prefix" ] || prefix=${PREFIX:-infusion}
printf '%s' "$prefix" | grep -Eq '^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$' || die "topic prefix '$prefix' is not valid"
count_ok "$readers" || die "--readers takes a number (0-99)"
count_ok "$nurses" || die "--nurse-stations takes a number (0-99)"
[ -n "$gateways$simulated" ] || die "no gateway: give --gateway ID (each room PC's host name), or --simulated"
gateways=$(echo $gateways)
printf 'GATEWAYS="%s"\nREADERS=%s\nNURSES=%s\nSIMULATED=%s\nPREFIX=%s\n' \
  "$gateways" "$readers" "$nurses" "$simulated" "$prefix" > "$dir/accounts.conf"

accounts=""  # "account role" lines
for id in $gateways; do
  name_ok "$id" || die "gateway id '$id' is not a valid name (lower-case letters, digits, - and _)"
  accounts="$accounts
gateway-$id gateway"
done
[ -z "$simulated" ] || accounts="$accounts
gateway-sim-gw gateway"
n=1; while [ "$n" -le "$readers" ]; do accounts="$accounts
reader-$n reader"; n=$((n + 1)); done
n=1; while [ "$n" -le "$nurses" ]; do accounts="$accounts
nurse-station-$n nurse"; n=$((n + 1)); done
accounts="$accounts
health health"

# --- passwords: kept across runs, one added for each new account -------------------------------------------------

passwords="$dir/passwords.env"
touch "$passwords"
chmod 600 "$passwords"
. "$passwords"
add() {  # add KEY: a random value unless the file has one (printf is built in: no value on a command line)
  eval "value=\${$1:-}"
  if [ -z "$value" ]; then printf '%s=%s\n' "$1" "$(rand)" >> "$passwords"; fi
}
add INFLUX_ADMIN_PASSWORD
add INFLUX_ADMIN_TOKEN
add GRAFANA_ADMIN_PASSWORD
while read -r account r; do
  [ -z "$account" ] || add "$(key_of "$account")"
done <<EOF
$accounts
EOF
. "$passwords"

# --- certificates ----------------------------------------------------------------------------------------------------

command -v openssl >/dev/null 2>&1 || die "openssl not found: sudo apt-get install -y openssl"
folder "$dir/tls"
if [ ! -f "$dir/tls/ca.key" ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$dir/tls/ca.key" -sha256 -days 3650 -subj "/CN=Infusion telemetry CA $site" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$dir/tls/ca.crt"
  echo "made the clinic CA $dir/tls/ca.crt (its key stays in $dir/tls/ca.key)"
fi
chmod 600 "$dir/tls/ca.key"
chmod 644 "$dir/tls/ca.crt"

issue() {  # issue FOLDER BASE SERVICE OWNER: FOLDER/BASE.crt and .key for the server names + SERVICE + localhost
  out=$1 base=$2 service=$3 owner=$4
  san=""
  for name in $names $service localhost; do
    if printf '%s' "$name" | grep -Eq '^[0-9]+(\.[0-9]+){3}$'; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
  done
  ext=$(mktemp)
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' \
    "${san#,}" > "$ext"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/$base.key.new" 2>/dev/null
  openssl req -new -key "$out/$base.key.new" -subj "/CN=$(echo $names | cut -d' ' -f1)" -out "$out/$base.csr"
  openssl x509 -req -in "$out/$base.csr" -CA "$dir/tls/ca.crt" -CAkey "$dir/tls/ca.key" -CAcreateserial \
    -CAserial "$dir/tls/ca.srl" -sha256 -days 730 -extfile "$ext" -out "$out/$base.crt.new" 2>/dev/null
  rm -f "$ext" "$out/$base.csr"
  give "$owner" 600 "$out/$base.key.new"
  give 0:0 644 "$out/$base.crt.new"
  mv -f "$out/$base.key.new" "$out/$base.key"
  mv -f "$out/$base.crt.new" "$out/$base.crt"
  cp "$dir/tls/ca.crt" "$out/ca.crt.new" && give 0:0 644 "$out/ca.crt.new" && mv -f "$out/ca.crt.new" "$out/ca.crt"
}

secret() {  # secret OWNER FILE VALUE: FILE holds VALUE, mode 0600, owned by OWNER
  printf '%s\n' "$3" > "$2.new"
  give "$1" 600 "$2.new"
  mv -f "$2.new" "$2"
}

# --- the broker ------------------------------------------------------------------------------------------------------

m="$dir/mosquitto"
folder "$m" "$m/health"
issue "$m" server mosquitto "$MOSQUITTO_UID:$MOSQUITTO_UID"

hash_passwords() {  # stdin: "account password" lines; writes the hashed file $1
  if command -v mosquitto_passwd >/dev/null 2>&1; then
    while read -r account password; do
      printf '%s\n%s\n' "$password" "$password" | mosquitto_passwd "$1" "$account" >/dev/null || exit 1
    done
  else
    # The same, in the broker's image; the lines go in on stdin.
    docker run -i --rm -v "$(dirname "$1"):/m" eclipse-mosquitto:2.0.20 sh -c '
      while read -r account password; do
        printf "%s\n%s\n" "$password" "$password" | mosquitto_passwd "/m/$0" "$account" >/dev/null || exit 1
      done' "$(basename "$1")"
  fi
}
rm -f "$m/passwd.new" "$m/acl.new"
: > "$m/passwd.new"
while read -r account r; do
  [ -n "$account" ] || continue
  eval "password=\${$(key_of "$account")}"
  printf '%s %s\n' "$account" "$password"
done <<EOF | hash_passwords "$m/passwd.new"
$accounts
EOF

{
  echo "# Written by deploy/make-secrets.sh for site \"$site\", topic prefix \"$prefix\": run it again to change this."
  echo "# mosquitto refuses whatever is not granted here (a refused publish is dropped silently over MQTT 3.1.1, answered"
  echo "# \"not authorized\" over MQTT 5). An ACL cannot forbid the retain flag: the gateway clears retained commands."
  echo "$accounts" | while read -r account r; do
    case $r in
      gateway)
        echo
        echo "# A gateway: everything of its site (readings, statuses, alarms, retained topics, its will, replies)."
        echo "user $account"
        echo "topic readwrite $prefix/$site/#" ;;
      reader)
        echo
        echo "# A screen, watch terminal or integration: read only."
        echo "user $account"
        echo "topic read $prefix/$site/#" ;;
      nurse)
        echo
        echo "# A nurse station: room and device commands only; reads the site (alarms, the gateway's replies)."
        echo "user $account"
        echo "topic read $prefix/$site/#"
        echo "topic write $prefix/$site/+/command"
        echo "topic write $prefix/$site/+/+/command" ;;
      health)
        echo
        echo "# docker compose's health check of the broker."
        echo "user $account"
        echo "topic read \$SYS/broker/uptime" ;;
    esac
  done
} > "$m/acl.new"
give "$MOSQUITTO_UID:$MOSQUITTO_UID" 600 "$m/passwd.new" "$m/acl.new"
mv -f "$m/passwd.new" "$m/passwd"
mv -f "$m/acl.new" "$m/acl"
# The health check's login: mosquitto_sub reads default options from $XDG_CONFIG_HOME/mosquitto_sub, so its password
# is in no command line (compose's healthcheck sets XDG_CONFIG_HOME to this folder).
secret "$MOSQUITTO_UID:$MOSQUITTO_UID" "$m/health/mosquitto_sub" "-u health
-P $MQTT_PASSWORD_HEALTH"

# --- InfluxDB, Grafana, the tokens folder, the simulated gateway, the dashboards ------------------------------------

folder "$dir/influxdb" "$dir/grafana" "$dir/tokens" "$dir/dashboards"
issue "$dir/influxdb" tls influxdb "$INFLUXDB_UID:$INFLUXDB_UID"
secret 0:0 "$dir/influxdb/admin-password" "$INFLUX_ADMIN_PASSWORD"
secret 0:0 "$dir/influxdb/admin-token" "$INFLUX_ADMIN_TOKEN"
issue "$dir/grafana" tls grafana "$GRAFANA_UID:$GRAFANA_UID"
secret "$GRAFANA_UID:$GRAFANA_UID" "$dir/grafana/admin-password" "$GRAFANA_ADMIN_PASSWORD"
if [ -n "$simulated" ]; then
  folder "$dir/gateway-sim"
  eval "password=\${$(key_of gateway-sim-gw)}"
  secret "$GATEWAY_UID:$GATEWAY_UID" "$dir/gateway-sim/mqtt-password" "$password"
fi
if [ -z "$(ls -A "$dir/dashboards")" ]; then
  cp "$repo"/dashboards/generated/*.json "$dir/dashboards/"
  chmod 644 "$dir"/dashboards/*.json
  echo "copied the shipped dashboards to $dir/dashboards (regenerate them with your alarm profile: docs/deploy.md)"
fi

echo "wrote $dir (site $site, server names:$(printf ' %s' $names)), accounts:"
echo "$accounts" | while read -r account r; do
  if [ -n "$account" ]; then echo "  $account ($r; password: $(key_of "$account") in $passwords)"; fi
done
