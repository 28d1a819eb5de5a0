# smoe in a container: `smoe serve` on port 8080, the model from a volume
# mounted at /models (no model is baked in). docs/scale-out.md says how to
# build, run and deploy it.
#
#   docker build -t smoe .
#   docker run --rm -p 8080:8080 -v /srv/models:/models:ro --memory 10808m smoe \
#       serve --host 0.0.0.0 --model /models/qwen3-30b-a3b-vault --ram-budget 8GiB

FROM rust:1.89-bookworm AS build
WORKDIR /src
# What the binary is built from, and nothing else: the built-in model is
# compiled in, the fixtures and tools are not needed.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY models models
# The kernels pick AVX2/AVX-512/NEON at run time, so a generic build runs
# at full speed on any CPU of the architecture.
RUN cargo build --release --locked -p smoe-cli \
    && install -m 0755 target/release/smoe /usr/local/bin/smoe

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/smoe /usr/local/bin/smoe
RUN useradd --system --uid 10001 --create-home --home-dir /home/smoe smoe
USER 10001
# Experts are read from here with O_DIRECT: mount a real filesystem (ext4,
# xfs), not an overlay or tmpfs, or smoe falls back to buffered reads.
VOLUME /models
EXPOSE 8080
ENTRYPOINT ["smoe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--model", "/models/model"]
