#!/usr/bin/env bash
# Makes .venv-ft: a free-threaded CPython (GIL off) with a free-threaded torch and the test tools.
#
# The interpreter, in order: $FT_PYTHON (nothing else is tried when it is set); one this script
# built before ($FT_PREFIX, default .python-ft/); a python3.14t or python3.13t on PATH; else
# CPython 3.13 built with --disable-gil from the upstream tarball in Debian trixie's python3.13
# source package (Debian's own patches are not applied). Why 3.13: trixie, Debian's stable
# release, ships 3.13; 3.14 is only in unstable. apt-get fetches the source into a private
# directory (lists, cache and download; the system's apt state is not touched) and checks it
# against Debian's signed release files. Building needs a Debian system with CPython's build
# dependencies (gcc, make, and the -dev packages of ssl, ffi, zlib, bz2, lzma, sqlite3).
#
# torch publishes free-threaded wheels for Linux only as CUDA builds (they run on a CPU without a
# GPU): cp313t up to 2.12.0, cp314t from 2.9.0. About 2.7 GB of downloads, so not part of CI.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
FT_VENV=$(absolute "${FT_VENV:-$ROOT/.venv-ft}")
FT_PREFIX=$(absolute "${FT_PREFIX:-$ROOT/.python-ft}")
[ -n "${FT_PYTHON:-}" ] && [[ "$FT_PYTHON" == */* ]] && FT_PYTHON=$(absolute "$FT_PYTHON")
DEBIAN_SUITE=${DEBIAN_SUITE:-trixie}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
BUILT_MARK=.blazefl-ft-built  # written last into $FT_PREFIX: the build completed
cd "$ROOT"

say() { printf 'ft-env: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

is_free_threaded() {
    [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 &&
        [ "$("$1" -c 'import sysconfig; print(sysconfig.get_config_var("Py_GIL_DISABLED"))' 2>/dev/null)" = 1 ]
}

build_python() {
    if [ -e "$FT_PREFIX" ]; then
        die "$FT_PREFIX exists but holds no complete free-threaded build; remove it (make clean-ft) \
or set FT_PREFIX"
    fi
    command -v apt-get >/dev/null || die "no python3.13t/python3.14t found and no apt-get to fetch \
CPython's source; set FT_PYTHON to a free-threaded interpreter"
    [ -r "$KEYRING" ] || die "$KEYRING is missing (install debian-archive-keyring), or set FT_PYTHON"
    local work
    # Beside the prefix, so that the finished install moves into place with one rename.
    mkdir -p "$(dirname "$FT_PREFIX")"
    work=$(mktemp -d "$(dirname "$FT_PREFIX")/.ft-build.XXXXXX")
    # shellcheck disable=SC2064  # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
    printf 'deb-src [signed-by=%s] %s %s main\n' "$KEYRING" "$DEBIAN_MIRROR" "$DEBIAN_SUITE" \
        >"$work/sources.list"
    local apt=(apt-get -q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=-
        -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1)
    [ "$(id -u)" = 0 ] && apt+=(-o APT::Sandbox::User=root)
    say "fetching python3.13's source from Debian $DEBIAN_SUITE ($DEBIAN_MIRROR)"
    "${apt[@]}" update >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; die "apt-get update failed"; }
    (cd "$work/src" && "${apt[@]}" source --download-only python3.13 >"$work/apt.log" 2>&1) ||
        { cat "$work/apt.log" >&2; die "apt-get source python3.13 failed"; }
    local tarball
    tarball=$(find "$work/src" -maxdepth 1 -name 'python3.13_*.orig.tar.xz' | head -n 1)
    [ -n "$tarball" ] || die "apt-get source python3.13 brought no python3.13_*.orig.tar.xz"
    say "building $(basename "$tarball") with --disable-gil into $FT_PREFIX (a few minutes)"
    tar -xJf "$tarball" -C "$work/src"
    local tree
    tree=$(find "$work/src" -maxdepth 1 -type d -name 'Python-3.13*' | head -n 1)
    [ -n "$tree" ] || die "no Python-3.13* directory in $tarball"
    # Our own make's flags and command-line variables (PYTHON=...) must not reach CPython's.
    unset MAKEFLAGS MFLAGS MAKELEVEL
    # The same optimisation level as the pyenv-built 3.11 the project's .venv uses (-O3, no PGO),
    # so the benchmark compares interpreters, not build flags. Installed into a staging
    # directory and moved into place whole: a failed or interrupted build leaves no $FT_PREFIX.
    (cd "$tree" && ./configure --quiet --prefix="$FT_PREFIX" --disable-gil --with-ensurepip=install \
        >"$work/build.log" 2>&1 && make -j"$(nproc)" >>"$work/build.log" 2>&1 &&
        make install DESTDIR="$work/dest" >>"$work/build.log" 2>&1) ||
        { tail -n 40 "$work/build.log" >&2; die "building CPython failed (log tail above)"; }
    local staged=$work/dest$FT_PREFIX
    "$staged/bin/python3.13t" -c 'import ssl, ctypes, zlib, lzma, bz2, sqlite3' 2>/dev/null ||
        die "the built CPython lacks ssl, ctypes, zlib, lzma, bz2 or sqlite3: install CPython's \
build dependencies (apt-get build-dep python3.13, or the -dev packages) and run again"
    touch "$staged/$BUILT_MARK"
    mv "$staged" "$FT_PREFIX"
}

PY=""
if [ -n "${FT_PYTHON:-}" ]; then
    is_free_threaded "$FT_PYTHON" ||
        die "FT_PYTHON=$FT_PYTHON is not found or not free-threaded (sysconfig Py_GIL_DISABLED != 1)"
    PY=$(command -v "$FT_PYTHON")
else
    for candidate in "$FT_PREFIX/bin/python3.13t" python3.14t python3.13t; do
        if [ "$candidate" = "$FT_PREFIX/bin/python3.13t" ] && [ ! -e "$FT_PREFIX/$BUILT_MARK" ]; then
            continue
        fi
        if is_free_threaded "$candidate"; then PY=$(command -v "$candidate"); break; fi
    done
fi
if [ -z "$PY" ]; then
    build_python
    PY=$FT_PREFIX/bin/python3.13t
    is_free_threaded "$PY" || die "$PY was built but is not free-threaded"
fi
say "interpreter: $PY ($("$PY" -VV | head -n 1))"

# A venv made by another interpreter (or whose pip is missing) is made again.
if [ -x "$FT_VENV/bin/python" ]; then
    made_by=$("$FT_VENV/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' \
        2>/dev/null || true)
    if [ "$made_by" != "$(realpath "$PY")" ] || ! "$FT_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        say "$FT_VENV was made by ${made_by:-an interpreter that no longer runs}: making it again"
        rm -f "$FT_VENV/.installed"
        "$PY" -m venv --clear "$FT_VENV"
    fi
else
    "$PY" -m venv "$FT_VENV"
fi
pip=("$FT_VENV/bin/python" -m pip)
case $("$FT_VENV/bin/python" -c 'import sys; print(sys.version_info[1])') in
    13) FT_TORCH=${FT_TORCH:-torch==2.12.0} ;;  # the last torch with cp313t wheels
    *) FT_TORCH=${FT_TORCH:-torch==2.13.0} ;;   # the project's own pin
esac
say "installing $FT_TORCH (a CUDA build: about 2.7 GB the first time) and the test tools"
"${pip[@]}" install --quiet --upgrade pip
# Wheels only (the project itself is still built): projects drop cp313t wheels as 3.14t takes
# over (numpy 2.5, the Rust-backed hypothesis releases), and pip would otherwise pick their
# newest sdists and compile them (numpy for many minutes; hypothesis needs crates.io) instead of
# taking the newest release that has a free-threaded wheel.
binary=(--only-binary=:all:)
"${pip[@]}" install --quiet "${binary[@]}" "$FT_TORCH"
"${pip[@]}" install --quiet "${binary[@]}" -e ".[testing,privacy]" "pytest>=8"
"$FT_VENV/bin/python" tools/ft_check.py
touch "$FT_VENV/.installed"
