# agentstore as a container image: `docker build -t agentstore .` from this directory.
#
# The image runs one cluster node (`agentstore node`) as an unprivileged user. Mount its
# configuration at /etc/agentstore/node.yaml (with `data_dir: /var/lib/agentstore` and the
# authority's public key beside it) and keep /var/lib/agentstore on a volume: the node's key,
# its admission and its data live there. deploy/docker.md walks through a three-node cluster;
# scripts/docker-test.sh builds the image and checks that walk-through end to end.

# Both bases are parameters so a registry mirror or a pinned digest can stand in.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The registry and the target directory are cached between builds of this stage.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p agentstore \
    && cp target/release/agentstore /usr/local/bin/agentstore

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/agentstore --no-create-home agentstore \
    && mkdir -p /var/lib/agentstore /etc/agentstore \
    && chown agentstore:agentstore /var/lib/agentstore \
    && chmod 0700 /var/lib/agentstore
COPY --from=build /usr/local/bin/agentstore /usr/local/bin/agentstore
USER agentstore
# JSON log lines for collectors; the embedded commands default to the same data directory.
ENV AGENTSTORE_LOG_FORMAT=json \
    RUST_LOG=warn,p2p_ai_agents=info \
    AGENTSTORE_DATA_DIR=/var/lib/agentstore
VOLUME /var/lib/agentstore
# The HTTP API, the peer port and the RESP port of the example configurations.
EXPOSE 7001 7101 7201
# SIGTERM: the node finishes the requests in progress and stops (give it `--time 30`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/agentstore"]
CMD ["node", "--config", "/etc/agentstore/node.yaml"]
