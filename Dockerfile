# The Tempest image: the director, the agent and the `tempest` CLI on Debian
# bookworm, copied from binaries built on the host (the host is bookworm
# too, so they run here as they are). Topology packages are not in the
# image: they are uploaded to the director and the agents fetch them.
#
#   cargo build --release -p tempest-director -p tempest-agent -p tempest-cli
#   docker build -t tempest:local .                  # or: docker compose build
#   docker build -t tempest:debug --build-arg PROFILE=debug .
#
# The build context is the repository root; .dockerignore keeps it to these
# binaries and docker/entrypoint.sh (no key ever enters an image: they are
# mounted when a container runs, see docker-compose.yml). On a machine that cannot pull images, scripts/docker-base-image
# builds debian:bookworm-slim locally first.
FROM debian:bookworm-slim

# The cargo profile whose binaries are copied: target/${PROFILE}/.
ARG PROFILE=release

# The tempest user the daemons run as has a fixed uid and gid, 999, so that
# files made for it on the host (`chown 999:999`) and the named volumes
# (made from the image, owned by it) keep their owner from one image to the
# next. The data directories hold the deployments' secrets and env: the
# tempest user's alone (the daemons make them 0700 at start too, whoever
# made them).
COPY docker/entrypoint.sh /usr/local/bin/tempest-entrypoint
RUN groupadd --system --gid 999 tempest \
    && useradd --system --uid 999 --gid tempest --home-dir /var/lib/tempest --create-home \
       --shell /usr/sbin/nologin tempest \
    && mkdir -p /var/lib/tempest-director /var/lib/tempest-agent /etc/tempest \
    && chown tempest:tempest /var/lib/tempest-director /var/lib/tempest-agent \
    && chmod 0700 /var/lib/tempest /var/lib/tempest-director /var/lib/tempest-agent \
    && chmod 0755 /usr/local/bin/tempest-entrypoint

COPY target/${PROFILE}/tempest-director target/${PROFILE}/tempest-agent target/${PROFILE}/tempest /usr/local/bin/

WORKDIR /var/lib/tempest
# The director's API and UI; an agent's API; the ports an agent gives its
# processes from its port_range (7500-7599 in docker/cluster): topology
# servers' ports and task workers' peer ports, which workers on the other
# agents' containers connect to. (EXPOSE only documents them: containers on
# one network reach each other's ports without publishing.)
EXPOSE 7300 7400 7500-7599
# The container starts as root only for the entrypoint to install the keys,
# certificates and tokens mounted in /run/secrets/tempest (any owner, mode
# 0600) into /run/tempest as the tempest user's (0600); it then runs the
# command as tempest, without capabilities (docker/entrypoint.sh). Listening
# beyond loopback, a daemon needs TLS and its credentials: files named in
# its configuration (docker/cluster/*.toml name /run/tempest/...), never
# flags. `docker exec` runs as root: pass `-u tempest` to read the daemons'
# /proc entries or their data directory as they do.
ENTRYPOINT ["tempest-entrypoint"]
CMD ["tempest-director", "--config", "/etc/tempest/director.toml"]
