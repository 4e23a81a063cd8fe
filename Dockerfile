# The service's container image. Multi-stage: the final image has no compiler, only the binary,
# runs as an unprivileged user, and needs a DATABASE_URL and API keys (see docker-compose.yml).
#   docker build -t inventory .
#   docker run --rm inventory keys new --role admin --name ops
FROM rust:1.95-bookworm AS build
# The commit in inventory_build_info (.git stays out of the build context): --build-arg INVENTORY_COMMIT=…
ARG INVENTORY_COMMIT=unknown
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin inventory \
 && cp target/release/inventory /inventory

FROM debian:bookworm-slim
# TLS roots for sslmode=verify-full ship inside the binary; nothing else is needed at run time.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin inventory
COPY --from=build /inventory /usr/local/bin/inventory
USER inventory
ENV INVENTORY_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["inventory"]
# Keys are required on a non-loopback address: INVENTORY_API_KEYS or INVENTORY_API_KEYS_FILE.
CMD ["serve", "--listen", "0.0.0.0:8080"]
