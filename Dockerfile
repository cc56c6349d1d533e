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
# binaries. On a machine that cannot pull images, scripts/docker-base-image
# builds debian:bookworm-slim locally first.
FROM debian:bookworm-slim

# The cargo profile whose binaries are copied: target/${PROFILE}/.
ARG PROFILE=release

# The data directories hold the deployments' secrets and env: the tempest
# user's alone (the daemons make them 0700 at start too, whoever made them).
RUN useradd --system --home-dir /var/lib/tempest --create-home --shell /usr/sbin/nologin tempest \
    && mkdir -p /var/lib/tempest-director /var/lib/tempest-agent /etc/tempest \
    && chown tempest:tempest /var/lib/tempest-director /var/lib/tempest-agent \
    && chmod 0700 /var/lib/tempest /var/lib/tempest-director /var/lib/tempest-agent

COPY target/${PROFILE}/tempest-director target/${PROFILE}/tempest-agent target/${PROFILE}/tempest /usr/local/bin/

USER tempest
WORKDIR /var/lib/tempest
# The director's API and UI; an agent's API; the ports an agent gives its
# processes from its port_range (7500-7599 in docker/cluster): topology
# servers' ports and task workers' peer ports, which workers on the other
# agents' containers connect to. (EXPOSE only documents them: containers on
# one network reach each other's ports without publishing.)
EXPOSE 7300 7400 7500-7599
# Listening beyond loopback, the director needs its credentials: give them
# in the environment (TEMPEST_ADMIN_TOKEN, TEMPEST_VIEWER_TOKEN,
# TEMPEST_AGENT_TOKEN) or as files named in a Cluster.toml, never as flags.
CMD ["tempest-director", "--listen", "0.0.0.0:7300", "--data-dir", "/var/lib/tempest-director"]
