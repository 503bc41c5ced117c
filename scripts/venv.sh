# Sourced by run_demo.sh and test.sh: a virtual environment the scripts own, made with
# the system's python3 (nothing is installed into it: Debian's python3 refuses that,
# PEP 668). Set PROG before sourcing; every failure is one line naming the fix.

die() { echo "$PROG: $*" >&2; exit 1; }

need_python() {
    command -v python3 >/dev/null 2>&1 \
        || die "python3 not found; install Python 3.10 or newer (Debian: apt-get install python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "python3 is $(python3 -c 'import platform; print(platform.python_version())'); kvstore needs 3.10 or newer"
}

# make_venv DIR: create DIR as a virtual environment unless a working one is there.
make_venv() {
    local dir=$1 ver pkg
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    need_python
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a separate package
        ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        pkg="python$ver-venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "$PROG: installing $pkg (python3 cannot create virtual environments without it)" >&2
            { apt-get install -y -q "$pkg" || { apt-get update -q && apt-get install -y -q "$pkg"; }; } >/dev/null 2>&1 \
                || die "cannot install $pkg with apt-get; install it by hand and rerun"
        else
            die "python3 cannot create virtual environments; ask root to run: apt-get install $pkg (then rerun)"
        fi
    fi
    rm -rf "$dir"
    python3 -m venv "$dir" >/dev/null 2>&1 || { rm -rf "$dir"; die "python3 -m venv $dir failed; run it by hand to see why"; }
}
