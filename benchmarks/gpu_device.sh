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
# service's whole stack and wrk, which "prepare" also puts in .device/ (~55 MB in all with
# PostgreSQL's server, below; the device tool carries up to 64 MiB).
# JOB_CPUS=all runs them as `make bench` would run there: no core set apart for anything, the
# clients among the rest (a machine with cores to spare, the issue's "fast host").
#
# Where this machine has PostgreSQL (Debian's layout, /usr/lib/postgresql/N), "prepare" also
# packs its server (~20 MB: the binaries, their share files and the libraries they link beyond
# glibc) and "watch" starts it there on 127.0.0.1:5432 as an unprivileged user, on JOB_CPUS,
# so that "results" measures both databases; the image there has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(sqlalchemy alembic mako markupsafe pydantic pydantic-core pydantic-settings
    python-dotenv annotated-types typing-inspection typing-extensions orjson
    fastapi starlette annotated-doc uvicorn httptools uvloop python-multipart cachetools
    prometheus-client httpx httpcore h11 anyio idna certifi click psycopg psycopg-binary
    opentelemetry-api)

PG_ROOT=/tmp/postgresql PG_DATA=/tmp/postgresql-data # where "watch" unpacks and runs it

pack_postgresql() {
    local bin version root=/tmp/postgresql-pack
    bin="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    if [ ! -x "$bin/postgres" ]; then
        echo "prepare: no PostgreSQL here; results will measure SQLite alone there"
        return 0
    fi
    version="$(basename "$(dirname "$bin")")"
    rm -rf "$root"
    mkdir -p "$root/usr/lib/postgresql/$version/bin" "$root/usr/lib/postgresql/$version/lib" \
        "$root/usr/share/postgresql" "$root/libs"
    cp "$bin"/{postgres,initdb,pg_ctl} "$root/usr/lib/postgresql/$version/bin/"
    # initdb loads these two; the conversions only when a client asks for another encoding.
    cp "$bin"/../lib/{plpgsql,dict_snowball}.so "$bin"/../lib/utf8_and_*.so \
        "$root/usr/lib/postgresql/$version/lib/"
    cp -r "/usr/share/postgresql/$version" "$root/usr/share/postgresql/"
    rm -rf "$root/usr/share/postgresql/$version"/{man,contrib}
    find "$root/usr/share/postgresql/$version/extension" -type f ! -name 'plpgsql*' -delete
    # The binaries find their share and library folders relative to their own place; the
    # libraries they link are loaded from libs/ (LD_LIBRARY_PATH), all but glibc's own.
    ldd "$bin"/{postgres,initdb,pg_ctl} | awk '/=> \// {print $3}' | sort -u |
        grep -Ev '/(libc|libm|libpthread|libdl|librt)\.so' | xargs -I{} cp -L {} "$root/libs/"
    tar -cJf .device/postgresql.tar.xz -C "$root" .
    rm -rf "$root"
}

# A program of the pack as user nobody (the server refuses root), on the cores $1 names ("all":
# any), its libraries from the pack (for it alone, not for the python3 that starts it).
as_nobody() {
    python3 -c 'import os, sys
cores, libs, program = sys.argv[1:4]
if cores != "all":
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.environ["LD_LIBRARY_PATH"] = libs
os.execv(program, sys.argv[3:])' "$1" "$PG_ROOT/libs" "${@:2}"
}

# PostgreSQL from the pack on 127.0.0.1:5432 with initdb's defaults, on JOB_CPUS as the service
# (where the service is confined, so is its database server, as on the machines CI runs on).
# Any step that fails returns 1: the caller goes on with SQLite alone.
start_postgresql() {
    [ -f .device/postgresql.tar.xz ] || return 0
    local bin cores="${JOB_CPUS:-0,1}"
    rm -rf "$PG_ROOT" "$PG_DATA" # a warm machine may hold an earlier run's
    mkdir -p "$PG_ROOT" "$PG_DATA" || return 1
    tar -xJf .device/postgresql.tar.xz -C "$PG_ROOT" || return 1
    chown 65534:65534 "$PG_DATA" || return 1
    bin="$(printf '%s\n' "$PG_ROOT"/usr/lib/postgresql/*/bin | tail -1)"
    as_nobody "$cores" "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 \
        --locale=C.UTF-8 >/dev/null || return 1
    # The log goes to the data folder (nobody cannot write into $OUT); the EXIT trap copies it.
    as_nobody "$cores" "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/log" \
        -o "-h 127.0.0.1 -p 5432 -k /tmp" -w start || return 1
    export MNIST_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres
}

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
    pack_postgresql
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
        export MNIST_DEVICE=cpu PATH="$PWD/.device/bin:$PATH"
        trap '[ ! -f "$PG_DATA/log" ] || cp "$PG_DATA/log" "$out/postgresql.log"' EXIT
        start_postgresql || echo "PostgreSQL did not start there; results measures SQLite alone"
        bench=(python3 -m benchmarks $(printf -- '--only %s ' ${SECTIONS:-metrics results})
            --runs "${RUNS:-7}" --no-profile --output "$out/benchmarks-host.md")
        if [ "${JOB_CPUS:-0,1}" != all ]; then
            export MNIST_BENCH_CLIENT_CPUS="${CLIENT_CPUS:-2,3}"
            bench=(python3 -c 'import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")}); os.execvp(sys.argv[2], sys.argv[2:])'
                "${JOB_CPUS:-0,1}" "${bench[@]}")
        fi
        "${bench[@]}" 2>&1 | tee "$out/host.log"
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
