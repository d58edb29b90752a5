#!/bin/sh
# Haraka for Mailferry: write the settings that come from the environment into Haraka's
# config folder, then run Haraka in the foreground.
#
#   MAILFERRY_AMQP_URL      RabbitMQ URL (required; URL-encode special characters in the password);
#                           a cluster's nodes' URLs separated by commas
#   MAILFERRY_NODE          this host's name where several hosts run Mailferry: the plugin
#                           publishes with routing key inbound.<node> (empty: inbound)
#   MAILFERRY_SPOOL_DIR     spool root shared with the consumer (default /var/spool/mailferry)
#   MAILFERRY_SMTP_DOMAINS  domains to accept mail for, comma or space separated; empty accepts
#                           every domain (Mailferry keeps mail for unknown users as unrouted)
#   MAILFERRY_SMTP_LISTEN   address:port Haraka listens on (default 0.0.0.0:2525)
#   HARAKA_DIR, HARAKA_BIN  the config root and the haraka binary (the image's by default;
#                           tests/test_ops_deploy.py runs this script outside a container)
set -eu

HARAKA_DIR="${HARAKA_DIR:-/etc/haraka}"
HARAKA_BIN="${HARAKA_BIN:-/opt/haraka/node_modules/.bin/haraka}"
CONFIG="$HARAKA_DIR/config"
: "${MAILFERRY_AMQP_URL:?MAILFERRY_AMQP_URL must be set (amqp://user:password@host:5672/%2F)}"
SPOOL="${MAILFERRY_SPOOL_DIR:-/var/spool/mailferry}"
mkdir -p "$SPOOL/incoming" "$SPOOL/failed"

# Merged over the plugin's own defaults (haraka-plugin-mailferry/config/mailferry.ini).
cat > "$CONFIG/mailferry.ini" <<INI
[main]
spool_dir=$SPOOL

[amqp]
url=$MAILFERRY_AMQP_URL
routing_key=inbound${MAILFERRY_NODE:+.$MAILFERRY_NODE}
INI

sed -i '/^listen=/d' "$CONFIG/smtp.ini"
echo "listen=${MAILFERRY_SMTP_LISTEN:-0.0.0.0:2525}" >> "$CONFIG/smtp.ini"

domains=$(printf '%s' "${MAILFERRY_SMTP_DOMAINS:-}" | tr ', ' '\n\n' | sed '/^$/d')
if [ -n "$domains" ]; then
  printf '%s\n' "$domains" > "$CONFIG/host_list"
  : > "$CONFIG/host_list_regex"
else
  echo "entrypoint: MAILFERRY_SMTP_DOMAINS is empty: accepting mail for every domain" >&2
  echo "localhost" > "$CONFIG/host_list"
  echo ".*" > "$CONFIG/host_list_regex"
fi

exec "$HARAKA_BIN" -c "$HARAKA_DIR"
