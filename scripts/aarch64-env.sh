#!/usr/bin/env bash
# An emulated Raspberry Pi 5 for checking shardline's maths on aarch64 without a board: Debian
# bookworm's aarch64 Python 3.11 run by qemu-user as a Cortex-A76 (the Pi 5's core: NEON, dot
# product, no SVE, no bf16), with the same pinned packages as requirements.txt, built for aarch64.
# It checks what differs between CPUs (which kernel code runs, and its results); it says nothing
# about speed (qemu is 10-50x slower than the board). Used by tests/test_aarch64.py:
#
#   ./test.sh --co -q >/dev/null                # the checkout's .venv first (its versions are copied)
#   sudo scripts/aarch64-env.sh                 # once: ~1.5 GB in /opt/shardline-aarch64, ~1 min
#   SHARDLINE_AARCH64_PYTHON=/opt/shardline-aarch64/python ./test.sh tests/test_aarch64.py   # ~5 min
#
# Needs root, a Debian bookworm x86-64 host (its arm64 packages: python3.11, libssl3, ...) and PyPI.
# System-wide it installs qemu-user-static and the aarch64 cross linker, and adds arm64 to dpkg's
# foreign architectures (for `apt-get download`; nothing arm64 is installed). No binfmt registration:
# qemu runs the interpreter directly, so the checks run in one process each (no mpirun: Open MPI's
# launcher finds no network interface under qemu-user; the multi-rank split is checked on the host).
#
# Two workarounds, both for emulation only:
# - PyPI's aarch64 torch wheel is a CUDA build (a Pi gets PyTorch's CPU wheel from setup.sh, which
#   needs download.pytorch.org); its CUDA libraries are replaced by stubs that define every symbol
#   torch imports from them and are never called on the CPU path (stubs.py below);
# - qemu-user passes the host's x86 /proc/cpuinfo through, on which PyTorch's cpuinfo and oneDNN's
#   CPU detection crash; the prefix holds a Cortex-A76 /proc/cpuinfo and MIDR_EL1 (qemu reads a
#   path from the prefix when it exists there).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${1:-/opt/shardline-aarch64}")
TORCH=$(grep -E '^torch==' requirements.txt | cut -d= -f3)
[ "$(id -u)" = 0 ] || { echo "run as root (apt-get, dpkg --add-architecture)" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || { echo "this emulates aarch64 on an x86-64 host" >&2; exit 1; }
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || {
  echo "this takes Debian bookworm's arm64 packages (python3.11 and its libraries); this host is" \
       "${PRETTY_NAME:-unknown}" >&2; exit 1; }
[ -x .venv/bin/python ] || {
  echo "no .venv here: run ./test.sh (or scripts/setup.sh requirements-dev.txt) first, as the user who" \
       "runs the tests; the emulated board gets the same package versions" >&2; exit 1; }
mkdir -p "$DIR"
export DEBIAN_FRONTEND=noninteractive

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu)
if [ ${#need[@]} -gt 0 ]; then
  echo "[aarch64] apt-get install ${need[*]}"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 1. Debian's aarch64 Python 3.11 and the C libraries it and the wheels load, unpacked (not installed)
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8 libssl3
  libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libgcc-s1 libstdc++6 libgomp1
  libcrypt1 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
  libkeyutils1 libzstd1"
if [ "$(cat "$DIR/root/.debs" 2>/dev/null)" != "$(echo $DEBS)" ]; then
  echo "[aarch64] Debian arm64 packages: python3.11 and its libraries"
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  rm -rf "$DIR/debs" "$DIR/root" && mkdir -p "$DIR/debs" "$DIR/root"
  (cd "$DIR/debs" && apt-get download -q $(printf '%s:arm64 ' $DEBS))
  for d in "$DIR"/debs/*.deb; do dpkg -x "$d" "$DIR/root"; done
  echo $DEBS > "$DIR/root/.debs"
fi
mkdir -p "$DIR/root/proc"
python3 - "$DIR/root/proc/cpuinfo" <<'PYEOF'
import sys
core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
        "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n")
open(sys.argv[1], "w").write("\n".join(core.format(i=i) for i in range(4)) + "\nModel\t\t: Raspberry Pi 5 (emulated)\n")
PYEOF
for c in $(seq 0 $(( $(nproc) - 1 ))); do
  mkdir -p "$DIR/root/sys/devices/system/cpu/cpu$c/regs/identification"
  echo 0x00000000414fd0b1 > "$DIR/root/sys/devices/system/cpu/cpu$c/regs/identification/midr_el1"  # Cortex-A76 r4p1
done

# 2. The same package versions as this checkout's .venv (scripts/setup.sh), aarch64 builds, each
#    without its dependencies (they are all in the list): pip would otherwise resolve accelerate's
#    torch to PyPI's CUDA one with 2 GB of NVIDIA libraries.
stamp="$DIR/site/.installed"
sum=$(.venv/bin/python -m pip freeze | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  echo "[aarch64] pip: this .venv's packages for manylinux aarch64 (torch $TORCH: ~430 MB)"
  rm -rf "$DIR/site" && mkdir -p "$DIR/site"
  # not needed by the checks, or no aarch64 wheel: the browser test's, the plots', the linters'
  .venv/bin/python -m pip freeze | grep -viE '^(torch|playwright|schemathesis|matplotlib|ansible-lint|nvidia|triton)' \
    > "$DIR/requirements.txt"
  plat=()
  for p in manylinux_2_28 manylinux_2_34 manylinux_2_31 manylinux_2_27 manylinux_2_17 manylinux2014 linux; do
    plat+=(--platform "${p}_aarch64")
  done
  .venv/bin/python -m pip install -q --no-deps --target "$DIR/site" "${plat[@]}" --only-binary=:all: \
    --python-version 3.11 --implementation cp "torch==$TORCH" -r "$DIR/requirements.txt"
  echo "$sum" > "$stamp"
fi

# 3. Stubs for the CUDA libraries the aarch64 torch wheel links against
echo "[aarch64] stubs for torch's CUDA libraries"
rm -rf "$DIR/stubs"
python3 scripts/aarch64_stubs.py "$DIR"

cat > "$DIR/python" <<EOF
#!/bin/sh
# aarch64 Python 3.11 as a Raspberry Pi 5's Cortex-A76 (qemu-user), with shardline's pinned packages
exec env PYTHONPATH="$DIR/site\${PYTHONPATH:+:\$PYTHONPATH}" qemu-aarch64-static -cpu \${QEMU_CPU:-cortex-a76} \\
  -L "$DIR/root" -E LD_LIBRARY_PATH="$DIR/stubs" "$DIR/root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$DIR/python"
"$DIR/python" -c "import platform, torch; print('[aarch64] ready:', platform.machine(), 'torch', torch.__version__, \
'capability', torch.backends.cpu.get_cpu_capability())"
echo "[aarch64] run: SHARDLINE_AARCH64_PYTHON=$DIR/python ./test.sh tests/test_aarch64.py"
