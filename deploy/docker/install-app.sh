#!/bin/sh
# Shared final steps of both image targets (cpu, cuda), run as root after the engine is installed:
# create the unprivileged user, install the project wheel built once in the `source` stage, and create
# the folders the server writes (model cache, SQLite store) owned by that user.
set -eu
: "${ALIGNER_UID:=10001}"
: "${ALIGNER_CACHE_DIR:?}"
groupadd --system --gid "$ALIGNER_UID" aligner
useradd --system --uid "$ALIGNER_UID" --gid aligner --home-dir /home/aligner --create-home --shell /usr/sbin/nologin aligner
pip install --no-cache-dir /wheels/*.whl
rm -rf /wheels
mkdir -p "$ALIGNER_CACHE_DIR" /data
chown -R aligner:aligner "$ALIGNER_CACHE_DIR" /data /app
# The engine must import the project's plugin (a `vllm.general_plugins` entry point) from the installed wheel.
python -c "import vllm, torch, server.engine.plugin; print('installed vllm', vllm.__version__, 'torch', torch.__version__)"
