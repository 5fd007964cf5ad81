# Sourced by the setup scripts: apt_install WHAT PACKAGE... installs the Debian packages with
# apt-get when run as root (returns 0); otherwise prints the command to run and returns 1.
# WHAT says what needs them, in the messages.
apt_install() {
    local what=$1
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing $* ($what)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
        return 0
    fi
    echo "setup: $what needs Debian packages; run as root:" >&2
    echo "    apt-get install --no-install-recommends $*" >&2
    echo "setup: (its tests skip until then, and fail under CI=true)" >&2
    return 1
}
