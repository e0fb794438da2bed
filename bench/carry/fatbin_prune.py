"""Zero the CUDA kernels a Hopper GPU (sm_90, e.g. the H200) never loads out of a shared library's fatbin.

pack.sh runs it on vLLM's `_C_stable_libtorch.abi3.so` before compressing: that library carries, per
compilation unit, cubins for sm_75/80/86/89/90/100/120 plus some PTX, each already zstd-compressed, so the
cubins for other GPUs cost ~40 MiB of the carry and compress no further.

The `.nv_fatbin` section holds fatbin containers (magic 0xBA55ED50); each holds entries (a cubin, kind 2,
or PTX, kind 1) with a 64-byte header naming the entry's size and SM arch. The driver picks, per
container, the cubin built for the device's arch, else JITs the newest PTX not newer than the device. So
in a container that has an sm_90 cubin every other entry is dead weight on sm_90; in one that has none,
only its PTX (arch <= 90) can ever run there. This script overwrites the dead entries' payloads with zeros
and leaves every header, offset and size as it was (nothing moves in the ELF); a compressor then squeezes
the zeros to nothing. A pruned library is for sm_90 GPUs only.

    python3 bench/carry/fatbin_prune.py --arch 90 path/to/lib.so [...]
    python3 bench/carry/fatbin_prune.py --list path/to/lib.so
"""

from __future__ import annotations

import argparse
import collections
import struct

MAGIC = 0xBA55ED50


def fatbin_section(data: bytes) -> tuple[int, int]:
    """(offset, size) of the `.nv_fatbin` section of a little-endian ELF64 file."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in heads:
        if data[strtab + name:data.index(b"\0", strtab + name)] == b".nv_fatbin":
            return offset, size
    raise ValueError("no .nv_fatbin section")


def containers(data: bytes, start: int, end: int):
    """Each fatbin container as a list of entries {pos, kind, hsize, size, arch, flags}."""
    pos = start
    while pos + 16 <= end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:  # containers are 8-byte aligned; skip padding
            pos += 8
            continue
        out, e = [], pos + hsize
        while e < pos + hsize + fsize:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            arch, = struct.unpack_from("<I", data, e + 28)
            flags, = struct.unpack_from("<Q", data, e + 40)
            out.append({"pos": e, "kind": kind, "hsize": ehsize, "size": psize, "arch": arch, "flags": flags})
            e += ehsize + psize
        yield out
        pos += hsize + fsize


def keep_entry(entry: dict, container: list[dict], arch: int) -> bool:
    has_cubin = any(e["kind"] == 2 and e["arch"] == arch for e in container)
    if entry["kind"] == 2:
        return entry["arch"] == arch
    return not has_cubin and entry["arch"] <= arch  # PTX is only needed where no cubin fits


def prune(path: str, arch: int) -> tuple[int, int]:
    data = bytearray(open(path, "rb").read())
    start, size = fatbin_section(bytes(data))
    zeroed = kept = 0
    for container in list(containers(bytes(data), start, start + size)):
        for e in container:
            if keep_entry(e, container, arch):
                kept += e["size"]
            else:
                a = e["pos"] + e["hsize"]
                data[a:a + e["size"]] = bytes(e["size"])
                zeroed += e["size"]
    with open(path, "wb") as f:
        f.write(data)
    return zeroed, kept


def listing(path: str) -> None:
    data = open(path, "rb").read()
    start, size = fatbin_section(data)
    total, count = collections.Counter(), collections.Counter()
    for container in containers(data, start, start + size):
        for e in container:
            key = ("ptx" if e["kind"] == 1 else "cubin", e["arch"])
            total[key] += e["size"]
            count[key] += 1
    print(f"{path}: fatbin {size / 2**20:.1f} MiB")
    for key in sorted(total):
        print(f"  {key[0]:5s} sm_{key[1]:<4d} {count[key]:4d} entries {total[key] / 2**20:7.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="the only SM arch kept (90 = Hopper)")
    ap.add_argument("--list", action="store_true", help="only list the entries by kind and arch")
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args()
    for path in args.paths:
        if args.list:
            listing(path)
            continue
        zeroed, kept = prune(path, args.arch)
        print(f"{path}: zeroed {zeroed / 2**20:.1f} MiB of kernels for other GPUs, "
              f"kept {kept / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
