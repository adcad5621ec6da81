"""Writes and mutates torch-format checkpoint files without torch (for the reader's tests).

`torch_pickle(...)` emits the pickle opcodes `torch.save` emits for a state dict (protocol 2,
`_rebuild_tensor_v2` over persistent-id storages), with any offset, size, stride or storage
declaration a test wants, valid or not. `mutants(...)` derives seeded damaged or crafted copies
of a real checkpoint: truncations, flipped bytes, edited pickle opcodes (numbers, names, globals
that would run code) and edited zip headers. Only the standard library and NumPy: the fuzz
child process imports this without jax.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import struct
import zlib
import zipfile
from dataclasses import dataclass

import numpy as np

ROOT = "archive"


@dataclass
class Tensor:
    """One state-dict entry: a view (offset, size, stride in elements) of storage `key`."""

    name: str
    key: str
    offset: object
    size: tuple
    stride: tuple
    storage_type: str = "FloatStorage"
    numel: object = None  # the storage's element count as the pickle declares it


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(n: int) -> bytes:
    data = pickle.encode_long(n)
    return b"\x8a" + bytes([len(data)]) + data if len(data) < 256 else (
        b"\x8b" + struct.pack("<i", len(data)) + data
    )


def _value(x) -> bytes:
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        return _int(x)
    if isinstance(x, float):
        return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
        return _str(x)
    if isinstance(x, (tuple, list)):
        return b"(" + b"".join(_value(v) for v in x) + b"t"
    raise TypeError(type(x))


def call(module: str, name: str, *args) -> bytes:
    """Opcodes that call module.name(*args) when unpickled by a trusting unpickler."""
    return _global(module, name) + _value(tuple(args)) + b"R"


def torch_pickle(tensors: list[Tensor], extra: dict[str, bytes] | None = None) -> bytes:
    """data.pkl of an OrderedDict state dict; `extra` maps names to raw opcode values."""
    out = bytearray(b"\x80\x02" + _global("collections", "OrderedDict") + b")R(")
    for t in tensors:
        pid = b"(" + _str("storage") + _global("torch", t.storage_type) + _str(t.key)
        pid += _str("cpu") + _value(t.numel) + b"tQ"
        args = pid + _value(t.offset) + _value(tuple(t.size)) + _value(tuple(t.stride))
        args += b"\x89" + _global("collections", "OrderedDict") + b")R"
        out += _str(t.name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
    for name, opcodes in (extra or {}).items():
        out += _str(name) + opcodes
    return bytes(out + b"u.")


def write_zip(path, entries: dict[str, bytes], deflated: tuple[str, ...] = ()) -> None:
    """A torch-style archive: `entries` under archive/, stored unless named in `deflated`."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            kind = zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED
            z.writestr(f"{ROOT}/{name}", data, compress_type=kind)


def write_checkpoint(path, tensors: list[Tensor], storages: dict[str, bytes], **kw) -> None:
    entries = {"data.pkl": torch_pickle(tensors), "byteorder": b"little", "version": b"3\n"}
    entries.update({f"data/{k}": v for k, v in storages.items()})
    write_zip(path, entries, **kw)


def float_storage(n: int) -> bytes:
    return np.arange(n, dtype=np.float32).tobytes()


# --- mutations of a real checkpoint (the fuzz test) ---

# Globals a malicious pickle calls to run code; the reader must never resolve them.
CODE_GLOBALS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "call"),
    ("builtins", "__import__"),
]
_INTERESTING_INTS = [
    0, 1, -1, 2, 7, 255, 2**31 - 1, 2**31, 2**32, 2**62, 2**63, -(2**63), 2**64, 10**40
]


def _read_zip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _rezip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def code_pickle(marker: str, kind: int) -> bytes:
    """A state dict whose value (or storage type, or rebuild argument) would run a command
    creating `marker`."""
    module, name = CODE_GLOBALS[kind % len(CODE_GLOBALS)]
    command = f"open({marker!r}, 'w').close()" if "eval" in name or "exec" in name else (
        f"touch {marker}")
    payload = call(module, name, command if name != "call" else ["touch", marker])
    if name == "__import__":
        payload = call("builtins", "__import__", "os")
    where = kind // len(CODE_GLOBALS) % 3
    head = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    if where == 0:  # a plain value of the state dict
        body = _str("x") + payload
    elif where == 1:  # the argument of a tensor rebuild
        body = _str("x") + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + payload
        body += _int(0) + _value((1,)) + _value((1,)) + b"\x89" + payload + b"tR"
    else:  # called through the pickle's REDUCE of a stubbed object's result
        body = _str("x") + payload + b")R"
    return head + body + b"u."


def _edit_pickle(pkl: bytes, rng: random.Random, marker: str) -> tuple[str, bytes]:
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    choice = rng.random()
    if choice < 0.15:
        return "pickle: code", code_pickle(marker, rng.randrange(3 * len(CODE_GLOBALS)))
    numeric = [i for i, (op, arg, _) in enumerate(ops) if isinstance(arg, int) and
               op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    strings = [i for i, (op, arg, _) in enumerate(ops) if isinstance(arg, str) and
               op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    globals_ = [i for i, (op, _, _) in enumerate(ops) if op.name == "GLOBAL"]
    if choice < 0.55 and numeric:
        i = rng.choice(numeric)
        value = rng.choice(_INTERESTING_INTS + [ops[i][1] + rng.randint(-3, 3)])
        new, what = _int(value), f"int {ops[i][1]} -> {value}"
    elif choice < 0.7 and strings:
        i = rng.choice(strings)
        value = rng.choice(["0", "1", "99", "../x", "", "a" * 100, "DoubleStorage", "storage"])
        new, what = _str(value), f"str {ops[i][1]!r} -> {value!r}"
    elif choice < 0.85 and globals_:
        i = rng.choice(globals_)
        module, name = rng.choice(CODE_GLOBALS + [
            ("torch", "DoubleStorage"), ("torch", "LongStorage"),
            ("torch._utils", "_rebuild_tensor"),
            ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("builtins", "set")])
        new, what = _global(module, name), f"global {ops[i][1]} -> {module}.{name}"
    else:
        i = rng.randrange(1, len(ops) - 1)
        action = rng.choice(["delete", "duplicate"])
        piece = pkl[ops[i][2]:ends[i]]
        new, what = (b"" if action == "delete" else piece * 2), f"{action} {ops[i][0].name}"
    return f"pickle: {what}", pkl[: ops[i][2]] + new + pkl[ends[i]:]


def _edit_zip_header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
    info = rng.choice(infos)
    # A header of this entry: local (at header_offset) or central (found by its name).
    local, central = info.header_offset, None
    cd = data.find(b"PK\x01\x02")
    while cd != -1:
        name_len = struct.unpack_from("<H", data, cd + 28)[0]
        if data[cd + 46:cd + 46 + name_len] == info.filename.encode():
            central = cd
            break
        cd = data.find(b"PK\x01\x02", cd + 4)
    # (field offset in local header, in central header, struct format)
    fields = {"method": (8, 10, "<H"), "flags": (6, 8, "<H"), "crc": (14, 16, "<I"),
              "compressed size": (18, 20, "<I"), "size": (22, 24, "<I"),
              "name length": (26, 28, "<H"), "header offset": (None, 42, "<I")}
    field = rng.choice(sorted(fields))
    lo, co, fmt = fields[field]
    header = rng.choice(["local", "central"]) if lo is not None else "central"
    if central is None:
        header = "local"
        if lo is None:
            lo, field = 22, "size"
    pos = (local + lo) if header == "local" else (central + co)
    bits = 16 if fmt == "<H" else 32
    value = rng.choice([0, 1, 8, 12, 14, 99, 2**bits - 1, 2**(bits - 1), rng.randrange(2**bits)])
    struct.pack_into(fmt, out, pos, value)
    return f"zip {header} header of {info.filename}: {field} -> {value}", bytes(out)


def mutants(source: bytes, seed: int, count: int, marker: str):
    """Yields (description, bytes) of `count` seeded mutations of the checkpoint `source`."""
    rng = random.Random(seed)
    entries = _read_zip(source)
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    for i in range(count):
        kind = i % 4
        if kind == 0:
            cut = rng.choice([rng.randrange(len(source)), len(source) - rng.randrange(1, 200)])
            yield f"truncated to {cut} bytes", source[:cut]
        elif kind == 1:
            out = bytearray(source)
            # Bias towards the pickle and the headers: flips in storages only fail the CRC.
            region = rng.choice(["anywhere", "start", "end"])
            for _ in range(rng.randint(1, 8)):
                if region == "anywhere":
                    p = rng.randrange(len(out))
                elif region == "start":
                    p = rng.randrange(min(len(out), 4096))
                else:
                    p = len(out) - 1 - rng.randrange(min(len(out), 4096))
                out[p] ^= rng.randrange(1, 256)
            yield f"bytes flipped ({region})", bytes(out)
        elif kind == 2:
            what, pkl = _edit_pickle(entries[pkl_name], rng, marker)
            yield what, _rezip({**entries, pkl_name: pkl})
        else:
            yield _edit_zip_header(source, rng)


def zeros_deflated(n_bytes: int) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of `n_bytes` zero bytes, built in milliseconds: each 1 MiB
    block is compressed once and repeated (a full flush makes the blocks independent)."""
    block = 1 << 20
    assert n_bytes % block == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    stream = piece * (n_bytes // block) + c.flush()
    crc, zero_block = 0, bytes(block)
    for _ in range(n_bytes // block):
        crc = zlib.crc32(zero_block, crc)
    return stream, crc


def write_raw_zip(path, entries: list[tuple[str, int, int, int, bytes]]) -> None:
    """A zip of (name, method, crc, declared size, payload) written as given: the declared size
    need not be what the payload inflates to."""
    local, central = bytearray(), bytearray()
    for name, method, crc, size, payload in entries:
        name_b = name.encode()
        offset = len(local)
        fields = (20, 0, method, 0, 0x21, crc, len(payload), size, len(name_b), 0)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + name_b + payload
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, offset
        ) + name_b
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(local), 0
    )
    with open(path, "wb") as f:
        f.write(bytes(local + central) + eocd)
