#!/bin/sh
# Secrets for docker compose and the broker's accounts (docs/deploy.md, "Broker accounts and ACL").
#
#  1. .env: written once from .env.example with random credentials (mode 0600); kept by later runs.
#  2. One MQTT account per role, each with a random password kept in .env (added when missing, never changed):
#       gateway-<id>       one per gateway: reads and writes everything under <prefix>/<site>/ (readings, statuses,
#                          alarms, the retained topics, its last will, command replies). Password: MQTT_PASSWORD for
#                          the first gateway (this PC's), MQTT_PASSWORD_GATEWAY_<ID> for the others.
#       reader-<n>         screens, `watch` terminals, integrations: read <prefix>/<site>/# only.
#       nurse-station-<n>  publish commands only (room and device command topics); read <prefix>/<site>/#.
#       health             compose's broker health check: $SYS/broker/uptime only.
#     The broker uses each account's name as its client id (use_username_as_clientid): two programs sharing an
#     account kick each other off, so give every screen, station and gateway its own.
#  3. <out>/passwd (hashed by mosquitto_passwd, which reads each password from stdin: no password is ever on a
#     command line) and <out>/acl, both rewritten whole on every run, mode 0600 and owned by the broker's user
#     (mosquitto opens them after dropping root).
#
# Usage: deploy/make-secrets.sh [--site SITE] [--prefix PREFIX] [--gateway ID]... [--readers N]
#                               [--nurse-stations N] [--env FILE] [--out DIR] [--owner UID:GID|none]
#   --site            default: SITE from .env
#   --prefix          MQTT topic prefix, default infusion
#   --gateway         repeatable; default: the ids in deploy/gateway.toml and deploy/gateway-sim.toml
#   --readers, --nurse-stations   how many accounts of each (default 1 each; 0 for none)
#   --env             default: .env in the repository root
#   --out             default: deploy/mosquitto (docker compose mounts it at /mosquitto/config)
#   --owner           owner of passwd and acl; default 1883:1883, the mosquitto user of the eclipse-mosquitto image
#                     (Debian's broker: mosquitto:mosquitto). Set as root, or with docker when not root.
#                     "none" leaves them to the caller (a broker running as the caller).
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
toml_id() { sed -n 's/^id *= *"\([^"]*\)".*/\1/p' "$1" | head -n 1; }

site="" prefix="infusion" gateways="" readers=1 nurses=1 env="$repo/.env" out="$repo/deploy/mosquitto" owner="1883:1883"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value"
  case $1 in
    --site) site=$2 ;;
    --prefix) prefix=$2 ;;
    --gateway) gateways="$gateways $2" ;;
    --readers) readers=$2 ;;
    --nurse-stations) nurses=$2 ;;
    --env) env=$(abspath "$2") ;;
    --out) out=$(abspath "$2") ;;
    --owner) owner=$2 ;;
    *) die "unknown option $1 (see the comment at the top of $0)" ;;
  esac
  shift 2
done

if [ ! -f "$env" ]; then
  # printf is built into the shell: the values never appear on a command line (sed -e would show them).
  while IFS= read -r line; do
    case $line in
      MQTT_PASSWORD*=*) ;;  # added below, one line per account
      INFLUX_ADMIN_PASSWORD=*) printf 'INFLUX_ADMIN_PASSWORD=%s\n' "$(rand)" ;;
      INFLUX_TOKEN=*) printf 'INFLUX_TOKEN=%s%s\n' "$(rand)" "$(rand)" ;;
      GRAFANA_ADMIN_PASSWORD=*) printf 'GRAFANA_ADMIN_PASSWORD=%s\n' "$(rand)" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done < .env.example > "$env"
  echo "wrote $env (edit SITE, TZ and the device paths)"
fi
chmod 600 "$env"
. "$env"

[ -n "$site" ] || site=${SITE:-}
name_ok "$site" || die "site '$site' is not a valid name (lower-case letters, digits, - and _; give --site or SITE in .env)"
printf '%s' "$prefix" | grep -Eq '^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$' || die "topic prefix '$prefix' is not valid"
if [ -z "$gateways" ]; then
  gateways="$(toml_id deploy/gateway.toml) $(toml_id deploy/gateway-sim.toml)"
fi
count_ok "$readers" || die "--readers takes a number (0-99)"
count_ok "$nurses" || die "--nurse-stations takes a number (0-99)"

# account role .env-key, one line each; the first gateway's password is MQTT_PASSWORD.
accounts=""
first=yes
for id in $gateways; do
  name_ok "$id" || die "gateway id '$id' is not a valid name (lower-case letters, digits, - and _)"
  if [ $first = yes ]; then key=MQTT_PASSWORD; first=no; else key=MQTT_PASSWORD_GATEWAY_$(echo "$id" | tr 'a-z-' 'A-Z_'); fi
  accounts="$accounts
gateway-$id gateway $key"
done
[ $first = no ] || die "no gateway: give --gateway ID"
n=1; while [ "$n" -le "$readers" ]; do accounts="$accounts
reader-$n reader MQTT_PASSWORD_READER_$n"; n=$((n + 1)); done
n=1; while [ "$n" -le "$nurses" ]; do accounts="$accounts
nurse-station-$n nurse MQTT_PASSWORD_NURSE_STATION_$n"; n=$((n + 1)); done
accounts="$accounts
health health MQTT_PASSWORD_HEALTH"

# Passwords: keep what .env has, add a random one for each new account, refuse an example value.
while read -r account role key; do
  [ -n "$account" ] || continue
  eval "password=\${$key:-}"
  case $password in
    "") printf '%s=%s\n' "$key" "$(rand)" >> "$env" ;;
    change-me*) die "$key in $env is still the example value: delete that line and run me again" ;;
  esac
done <<EOF
$accounts
EOF
chmod 600 "$env"
. "$env"

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

(umask 022 && mkdir -p "$out")  # the broker must be able to enter it
passwd_new="$out/passwd.new" acl_new="$out/acl.new"
rm -f "$passwd_new" "$acl_new"
: > "$passwd_new"
while read -r account role key; do
  [ -n "$account" ] || continue
  eval "password=\${$key}"
  printf '%s %s\n' "$account" "$password"
done <<EOF | hash_passwords "$passwd_new"
$accounts
EOF

{
  echo "# Written by deploy/make-secrets.sh for site \"$site\", topic prefix \"$prefix\": run it again to change this."
  echo "# mosquitto refuses whatever is not granted here (a refused publish is dropped silently over MQTT 3.1.1, answered"
  echo "# \"not authorized\" over MQTT 5). An ACL cannot forbid the retain flag: the gateway clears retained commands."
  echo "$accounts" | while read -r account role key; do
    case $role in
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
} > "$acl_new"

chmod 600 "$passwd_new" "$acl_new"
if [ "$owner" != none ]; then
  if [ "$(id -u)" = 0 ]; then
    chown "$owner" "$passwd_new" "$acl_new"
  elif command -v docker >/dev/null 2>&1; then
    docker run --rm -v "$out:/m" eclipse-mosquitto:2.0.20 chown "$owner" /m/passwd.new /m/acl.new
  else
    rm -f "$passwd_new" "$acl_new"
    die "cannot give passwd and acl to $owner (the broker's user): run me as root, or --owner none if the broker runs as you"
  fi
fi
mv -f "$passwd_new" "$out/passwd"
mv -f "$acl_new" "$out/acl"
echo "wrote $out/passwd and $out/acl (site $site), accounts:"
echo "$accounts" | while read -r account role key; do
  if [ -n "$account" ]; then echo "  $account ($role; password: $key in $env)"; fi
done
