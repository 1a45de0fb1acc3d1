# syntax=docker/dockerfile:1
# Build: docker build -t wavelog-worker .
# Run:   docker run -e WORKER_SECRET=$(openssl rand -hex 32) -e WORKER_INTERNAL_BIND=0.0.0.0 \
#          -p 9000:9000 -p 127.0.0.1:9001:9001 wavelog-worker
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tools ./tools
COPY js-client ./js-client
RUN cargo build --release --locked --bin wavelog-worker

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin worker
COPY --from=build /src/target/release/wavelog-worker /usr/local/bin/wavelog-worker
COPY worker.toml /etc/wavelog-worker/worker.toml
# In a container the internal API must listen beyond loopback to be reachable from Wavelog's
# container; publish port 9001 only on a private network (never to the internet).
ENV WORKER_INTERNAL_BIND=0.0.0.0
USER 10001
EXPOSE 9000 9001
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
  CMD ["wavelog-worker", "--config", "/etc/wavelog-worker/worker.toml", "healthcheck"]
ENTRYPOINT ["wavelog-worker", "--config", "/etc/wavelog-worker/worker.toml"]
