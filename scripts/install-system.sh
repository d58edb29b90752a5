#!/usr/bin/env bash
# Install the system packages Mailferry's tests and `make run` need, on Debian 12, as root.
#
# Idempotent: installs only what is missing (one line printed per package installed), runs
# `apt-get update` once and only when something is missing, and does nothing at all when
# everything is there. The packages' own daemons are NOT started by the install (a temporary
# /usr/sbin/policy-rc.d that exits 101): the project starts its own throwaway servers on free
# loopback ports (devstack/). System daemons that are running anyway are left alone.
#
#   rabbitmq-server  the broker                      (devstack/rabbitmq.py)
#   postgresql       PostgreSQL 15                   (devstack/postgres.py)
#   dovecot-imapd    an IMAP server                  (devstack/dovecot.py)
#   openssl          its self-signed test certificate
#   swaks            an SMTP client for tests
#   postfix          for smtp-source (SMTP load); debconf "No configuration"
#   prometheus       prometheus and promtool (rule/config checks)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# package|how to tell it is there (a shell test; the package counts as present if either
# dpkg says it is installed or this test passes)
PACKAGES=(
  "rabbitmq-server|test -x /usr/lib/rabbitmq/bin/rabbitmq-server || command -v rabbitmq-server"
  "postgresql|ls /usr/lib/postgresql/*/bin/initdb || command -v initdb"
  "dovecot-imapd|test -x /usr/lib/dovecot/imap && command -v dovecot"
  "openssl|command -v openssl"
  "swaks|command -v swaks"
  "postfix|command -v smtp-source || test -x /usr/sbin/smtp-source"
  "prometheus|command -v prometheus && command -v promtool"
)

dpkg_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

present() {
  local pkg=$1 check=$2
  dpkg_installed "$pkg" || (PATH="$PATH:/usr/sbin:/sbin"; eval "$check") >/dev/null 2>&1
}

missing=()
for entry in "${PACKAGES[@]}"; do
  pkg=${entry%%|*}
  check=${entry#*|}
  present "$pkg" "$check" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-system.sh: missing system packages: ${missing[*]}" >&2
  echo "install-system.sh: installing them needs root: sudo $0" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system.sh: missing ${missing[*]} and no apt-get here (Debian 12 expected)" >&2
  exit 1
fi

LOG=$(mktemp /tmp/mailferry-install-system.XXXXXX.log)

# Keep the packages' daemons from starting while they install; put back whatever
# policy-rc.d was there before (or none) when done, whatever happens.
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
  POLICY_BACKUP=$(mktemp /tmp/mailferry-policy-rc.d.XXXXXX)
  cp -a "$POLICY" "$POLICY_BACKUP"
fi
restore_policy() {
  if [ -n "$POLICY_BACKUP" ]; then
    cp -a "$POLICY_BACKUP" "$POLICY" && rm -f "$POLICY_BACKUP"
  else
    rm -f "$POLICY"
  fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# scripts/install-system.sh: no daemon starts during the install\nexit 101\n' >"$POLICY"
chmod 0755 "$POLICY"

for pkg in "${missing[@]}"; do
  if [ "$pkg" = postfix ]; then
    # Only smtp-source is wanted: no mail system gets configured.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  fi
done

APT_OPTS=(-y -q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=600)
if ! apt-get "${APT_OPTS[@]}" update >>"$LOG" 2>&1; then
  echo "install-system.sh: apt-get update failed; last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
if ! apt-get "${APT_OPTS[@]}" install "${missing[@]}" >>"$LOG" 2>&1; then
  echo "install-system.sh: apt-get install ${missing[*]} failed; last lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi

status=0
for entry in "${PACKAGES[@]}"; do
  pkg=${entry%%|*}
  check=${entry#*|}
  case " ${missing[*]} " in *" $pkg "*) ;; *) continue ;; esac
  if present "$pkg" "$check"; then
    echo "installed $pkg $(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
  else
    echo "install-system.sh: $pkg still missing after apt-get install (see $LOG)" >&2
    status=1
  fi
done
[ $status -eq 0 ] && rm -f "$LOG"
exit $status
