#!/usr/bin/env bash
# The GPU part of `make bench` as one prepared run on a lent CUDA machine (the device tool).
#
#   bash benchmarks/gpu_device.sh prepare     here, where pip reaches the package index
#   bash benchmarks/gpu_device.sh run         there: device run, carry [".device"]
#   bash benchmarks/gpu_device.sh tests       there: the card's tests alone (a minute less)
#   bash benchmarks/gpu_device.sh watch       there: watching and time to result on its CPUs
#
# The card's image has Python 3.12 with PyTorch, numpy, Pillow, httpx, tqdm and pytest, but not
# the service's database and settings packages, and MNIST's files do not travel with the
# checkout. "prepare" puts both in .device/ (git-ignored, ~20 MB): the wheels, at the versions
# this checkout's .venv runs, and the four IDX files gzipped. "run" installs and unpacks them,
# runs the tests that need a card (the CUDA graph against eager training, one wait per
# checkpoint) and the training tests, then `python -m benchmarks.gpu`; everything it prints
# lands in $OUT.
#
# "watch" uses the machine's many cores instead of its card: the benchmark's "metrics" and
# "results" sections on the CPU, the service and its worker confined to two cores as on the
# machines CI runs on (JOB_CPUS). In "metrics" the clients that stand for users (wrk's
# pollers, the stream client) run on two others (CLIENT_CPUS, MNIST_BENCH_CLIENT_CPUS), as
# clients on other machines would; "results" polls and follows from the benchmark's own
# process, on JOB_CPUS. SECTIONS picks fewer. It needs the
# service's whole stack and wrk, which "prepare" also puts in .device/ (~40 MB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(sqlalchemy alembic mako markupsafe pydantic pydantic-core pydantic-settings
    python-dotenv annotated-types typing-inspection typing-extensions orjson
    fastapi starlette annotated-doc uvicorn httptools uvloop python-multipart cachetools
    prometheus-client httpx httpcore h11 anyio idna certifi click psycopg psycopg-binary
    opentelemetry-api)

case "${1:-}" in
prepare)
    rm -rf .device
    mkdir -p .device/wheels .device/mnist
    pins=()
    for name in "${PACKAGES[@]}"; do
        pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "${DEVICE_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .device/wheels "${pins[@]}"
    raw="${MNIST_DATA_DIR:-../shared/datasets}/MNIST/raw"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
        t10k-labels-idx1-ubyte; do
        gzip -c "$raw/$f" >".device/mnist/$f.gz"
    done
    # wrk with the libraries it links beyond glibc, run through a wrapper that finds them.
    mkdir -p .device/bin .device/lib
    wrk="$(command -v wrk)" || { echo "prepare needs wrk: apt-get install wrk" >&2; exit 1; }
    cp "$wrk" .device/bin/wrk.bin
    for lib in libluajit-5.1.so.2 libssl.so.3 libcrypto.so.3; do
        path="$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')"
        [ -n "$path" ] || { echo "prepare: $lib not found (wrk links it)" >&2; exit 1; }
        cp -L "$path" .device/lib/
    done
    printf '%s\n' '#!/bin/sh' 'here="$(dirname "$0")"' \
        'LD_LIBRARY_PATH="$here/../lib" exec "$here/wrk.bin" "$@"' >.device/bin/wrk
    chmod +x .device/bin/wrk
    du -sh .device
    ;;
run | tests | watch)
    out="${OUT:-/tmp/gpu-device-out}"
    mkdir -p "$out" /tmp/mnist/MNIST/raw
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .device/wheels/*.whl
    for f in .device/mnist/*.gz; do
        gunzip -c "$f" >"/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"
    done
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MNIST_DATA_DIR=/tmp/mnist
    nvidia-smi -L | tee "$out/card.txt" || true
    if [ "$1" = watch ]; then
        export MNIST_DEVICE=cpu MNIST_BENCH_CLIENT_CPUS="${CLIENT_CPUS:-2,3}" PATH="$PWD/.device/bin:$PATH"
        python3 -c 'import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")}); os.execvp(sys.argv[2], sys.argv[2:])' \
            "${JOB_CPUS:-0,1}" python3 -m benchmarks $(printf -- '--only %s ' ${SECTIONS:-metrics results}) \
            --runs "${RUNS:-7}" --no-profile --output "$out/benchmarks-host.md" 2>&1 |
            tee "$out/host.log"
        exit 0 # set -e and pipefail have ended the script if the benchmark failed
    fi
    status=0
    python3 -m pytest -q -p no:cacheprovider tests/workers/training/test_graphs.py \
        tests/workers/test_host_sync.py tests/workers/training/test_train.py 2>&1 | tee "$out/tests.log" ||
        status=1
    if [ "$1" = run ]; then
        python3 -m benchmarks.gpu --runs "${RUNS:-5}" --output "$out/benchmarks-gpu.md" 2>&1 |
            tee "$out/bench.log" || status=1
    fi
    exit "$status"
    ;;
*)
    echo "usage: $0 prepare|run|tests|watch" >&2
    exit 2
    ;;
esac
