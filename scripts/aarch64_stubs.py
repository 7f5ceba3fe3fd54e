"""Stub libraries for the CUDA libraries PyPI's aarch64 torch wheel links against (scripts/aarch64-env.sh).

That wheel is a CUDA build: its libtorch_*.so need libcudart, libcublas, libcudnn, ... at load time,
which an emulated Pi has no use for (a real Pi gets PyTorch's CPU wheel). For every library torch
needs and the prefix lacks, this builds an aarch64 shared object with that soname defining every
symbol torch imports from it, under the symbol versions torch asks for (readelf -V). Each stub
function returns 0 and touches nothing; the CPU path never calls one, except the CUDA runtime's
start-up registration (__cudaRegisterFatBinary gets a zeroed buffer as its handle).

    python3 scripts/aarch64_stubs.py DIR     # DIR/site/torch -> DIR/stubs/*.so
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

READELF = "aarch64-linux-gnu-readelf"
CC = "aarch64-linux-gnu-gcc"
PRELUDE = "static long zeros[512];\n"


def readelf(*args: str) -> str:
    return subprocess.run([READELF, *args], capture_output=True, text=True, check=True).stdout


def dynsyms(path: str):
    """(type, bind, section, name@version) of every dynamic symbol."""
    for line in readelf("--dyn-syms", "-W", path).splitlines():
        p = line.split()
        if len(p) >= 8 and p[0].endswith(":"):
            yield p[3], p[4], p[6], p[7]


def main(root: str) -> None:
    torch_dir = os.path.join(root, "site", "torch")
    libs = sorted(glob.glob(f"{torch_dir}/lib/*.so*") + glob.glob(f"{torch_dir}/*.so"))
    dirs = [f"{torch_dir}/lib", f"{root}/root/lib/aarch64-linux-gnu", f"{root}/root/usr/lib/aarch64-linux-gnu"]
    present = {f: os.path.join(d, f) for d in dirs if os.path.isdir(d) for f in os.listdir(d)}
    missing = sorted({m for lib in libs for m in re.findall(r"Shared library: \[(.+?)\]", readelf("-d", lib))
                      if m not in present})
    # which file each (library, version name) must come from
    verfile, cur = {}, None
    for lib in libs:
        for line in readelf("-V", "-W", lib).splitlines():
            if m := re.search(r"File: (\S+)", line):
                cur = m.group(1)
            if (m := re.search(r"Name: (\S+)", line)) and cur:
                verfile[(os.path.basename(lib), m.group(1))] = cur
    defined = {name.split("@")[0] for f, path in present.items()
               if ".so" in f and os.path.isfile(path) and not os.path.islink(path)
               for _t, _b, ndx, name in dynsyms(path) if ndx != "UND"}
    per: dict[str, dict[str, tuple[str, str]]] = {m: {} for m in missing}
    catchall = "libcudart.so.13" if "libcudart.so.13" in per else (missing[0] if missing else None)
    for lib in libs:
        for typ, bind, ndx, name in dynsyms(lib):
            if ndx != "UND" or bind == "WEAK":
                continue
            base, _, ver = name.partition("@")
            ver = ver.lstrip("@")
            target = verfile.get((os.path.basename(lib), ver)) if ver else None
            if target not in per:
                if base in defined:
                    continue
                target = catchall
            per[target][base] = (typ, ver)
    out = os.path.join(root, "stubs")
    os.makedirs(out, exist_ok=True)
    for lib, syms in per.items():
        body = [f"char {s}[256];" if typ == "OBJECT" else
                f"long {s}(void) {{ return {'(long)zeros' if s == '__cudaRegisterFatBinary' else '0'}; }}"
                for s, (typ, _v) in sorted(syms.items())]
        src = os.path.join(out, lib + ".c")
        with open(src, "w") as f:
            f.write(PRELUDE + "\n".join(body) + "\n")
        cmd = [CC, "-shared", "-fPIC", "-nostdlib", "-o", os.path.join(out, lib), f"-Wl,-soname,{lib}", src]
        versions: dict[str, list[str]] = {}
        for s, (_t, v) in syms.items():
            versions.setdefault(v, []).append(s)
        if any(versions):     # an all-unversioned library needs no script
            script = "".join(f"{v} {{ global: {'; '.join(sorted(ss))}; }};\n" for v, ss in versions.items() if v)
            # unversioned symbols stay global outside the nodes (ld refuses an anonymous node beside them)
            with open(src[:-2] + ".map", "w") as f:
                f.write(script)
            cmd.append(f"-Wl,--version-script={src[:-2]}.map")
        subprocess.run(cmd, check=True)
    print(f"[aarch64] {len(per)} stub libraries in {out}: {', '.join(per) or 'none needed'}")


if __name__ == "__main__":
    main(sys.argv[1])
