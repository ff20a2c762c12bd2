# One hospital's p2p-fl in a container, from the lock file (every site the same versions).
#   CPU:  docker build -t p2p-fl .
#   GPU:  docker build --build-arg EXTRAS=cuda -t p2p-fl:cuda .   (run with --gpus all)
# Run a node: the topology, the site's secret key and its images mounted read-only, its
# state in a volume; --network host, so that the node binds the address the topology lists
# for it, as it would outside a container (docs/deploying.md):
#   docker run -d --restart on-failure --network host \
#     -v /etc/p2p_fl:/etc/p2p_fl:ro -v /srv/xrays:/data:ro -v p2pfl-state:/var/lib/p2p_fl \
#     p2p-fl node --config /etc/p2p_fl/federation.toml --name hospital-a \
#       --key /etc/p2p_fl/keys/hospital-a.key_secret --data /data --out /var/lib/p2p_fl/hospital-a
# (--restart on-failure restarts exit 2, 3 and 4 too: the systemd unit in launch/ does not.)
# A demo federation inside it: docker run --rm p2p-fl launch topologies/ring-3.toml --out /var/lib/p2p_fl/demo
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=""
RUN useradd --system --create-home --home-dir /var/lib/p2p_fl --shell /usr/sbin/nologin p2pfl
WORKDIR /opt/p2p_fl
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY p2p_fl ./p2p_fl
COPY topologies ./topologies
COPY launch ./launch
RUN pip install --no-cache-dir --no-deps . && if [ -n "$EXTRAS" ]; then pip install --no-cache-dir ".[$EXTRAS]"; fi
USER p2pfl
ENV P2P_FL_XLA_CACHE=/var/lib/p2p_fl/xla-cache
VOLUME ["/var/lib/p2p_fl"]
ENTRYPOINT ["p2p-fl"]
CMD ["--help"]
