# Sourced by demo.sh and test.sh: system packages and a sanity check of the
# host. Idempotent; quiet when everything is there already.
need_pkgs=()
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v tc >/dev/null || need_pkgs+=(iproute2)
command -v setpriv >/dev/null || need_pkgs+=(util-linux)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v as >/dev/null || need_pkgs+=(binutils)
command -v cc >/dev/null || need_pkgs+=(gcc)
# The font `postcopy report --plot` draws its text with.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_pkgs+=(fonts-dejavu-core)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing ${need_pkgs[*]}; run as root to install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need_pkgs[@]}"
fi
if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: no Rust toolchain (cargo) found; install one with rustup" >&2
        exit 1
    fi
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup: postcopy needs root (kernel-mode userfaultfd, /dev/kvm, network namespaces)" >&2
    exit 1
fi
kernel=$(uname -r)
major=${kernel%%.*}; rest=${kernel#*.}; minor=${rest%%.*}
if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 7 ]; }; then
    echo "setup: Linux $kernel is too old: dirty tracking needs PAGEMAP_SCAN (Linux 6.7+)" >&2
    exit 1
fi
