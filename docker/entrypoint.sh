#!/bin/sh
# The Tempest image's entrypoint. docker-compose.yml mounts each container's
# own keys, certificates and tokens, read-only, as files in
# /run/secrets/tempest: owned by whoever ran `tempest cluster init` on the
# host and readable by that user only (0600), so the image's tempest user
# could not read them there. Started as root, this copies them to
# /run/tempest (a directory of the container's own, 0700), each owned by
# tempest (uid and gid 999) and mode 0600, then runs the command as tempest
# with no capabilities and no way to gain any (setpriv): the daemons never
# run as root.
#
# Started as another user (`docker run --user ...`, compose's `user:`), it
# installs nothing and runs the command as it is: the files the daemon's
# configuration names must then be readable by that user.
set -eu

in=/run/secrets/tempest
out=/run/tempest

if [ "$(id -u)" -ne 0 ]; then
  exec "$@"
fi

umask 077
# A restarted container starts from the files mounted now, not from a
# previous start's copies.
rm -rf "$out"
mkdir -m 0700 "$out"
if [ -d "$in" ]; then
  for f in "$in"/* "$in"/.[!.]*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    if [ ! -f "$f" ]; then
      echo "tempest-entrypoint: $f is not a file: docker-compose.yml mounts it from the" \
        "TLS directory (docker/tls, or \$TEMPEST_TLS_DIR); make that directory's files" \
        "with \`tempest cluster init -o docker/tls/Cluster.toml --host director --host agent1" \
        "--host agent2 --host agent3\` (and remove any directory Docker made in place of a" \
        "missing file)" >&2
      exit 1
    fi
    install -o tempest -g tempest -m 0600 "$f" "$out/${f##*/}"
  done
fi
chown tempest:tempest "$out"

exec setpriv --reuid=tempest --regid=tempest --init-groups \
  --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
