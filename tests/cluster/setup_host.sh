#!/bin/sh
# Install what the cluster test (tests/test_cluster.py) needs on the machine that runs it:
# sshd for the test hosts, `ip` (iproute2) for network namespaces, a bridge and veth pairs,
# `unshare` (util-linux) for a host name and a private home per test host, and the Debian
# python3 (Ansible runs its modules with it), python3-venv and python3-packaging that a provisioned
# board has.
#
# Idempotent and safe to run as root in CI: it installs missing packages only and never starts
# a system sshd (each test host runs its own, inside its namespace, started by the test).
# Without root it does nothing and says so; the cluster test then skips with that reason.
set -eu

packages="openssh-server openssh-client iproute2 util-linux procps python3 python3-venv python3-packaging"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup_host.sh: not root, not installing: $packages (the cluster test will skip)" >&2
    exit 0
fi

missing=""
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    echo "setup_host.sh: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d keeps the package scripts from starting a system-wide sshd.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
else
    echo "setup_host.sh: all present: $packages"
fi

# sshd's privilege-separation directory; systemd makes it at boot, containers often lack it.
install -d -m 0755 /run/sshd
