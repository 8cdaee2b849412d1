"""`storage.tar_samples`, kiln's one tar reader, against Python's `tarfile` reading the same
archives: the same samples and bytes, and the same damage raising the same error or ending
the archive at the same place, for kiln's own tars, tars `tarfile` writes in its three
formats (GNU long names, ustar prefixes, pax headers), compressed tars, and tars cut or
corrupted at every kind of place."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln import storage


def tarfile_samples(url: str, *, read: Callable[[int], bool] | None = None) -> Any:
    """What `tar_samples` returned when it was written over `tarfile` (the reference)."""
    out: list[tuple[int, str, dict[str, bytes]]] = []
    index, key, want = -1, None, True
    members: dict[str, bytes] = {}
    with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = storage.sample_key(m.name)
            if not ext or k.rpartition("/")[2].startswith("__"):
                continue
            if k != key:
                if key is not None:
                    out.append((index, key, members))
                index, key, members = index + 1, k, {}
                want = read is None or read(index)
            if want:
                fh = tar.extractfile(m)
                members[ext] = fh.read() if fh is not None else b""
    if key is not None:
        out.append((index, key, members))
    return out


def outcome(reader: Callable[..., Any], url: str, read: Callable[[int], bool] | None) -> Any:
    try:
        return list(reader(url, read=read))
    except tarfile.TarError as e:
        return type(e).__name__


READS: list[Callable[[int], bool] | None] = [None, lambda i: i % 2 == 0, lambda i: False]


def assert_same(path: Path) -> None:
    for read in READS:
        ours = outcome(storage.tar_samples, str(path), read)
        assert ours == outcome(tarfile_samples, str(path), read), path.name


def samples(n: int = 4) -> list[tuple[str, bytes]]:
    members = [("__meta__.json", b"{}")]
    for i in range(n):
        members += [(f"{i:04d}.jpg", bytes(range(256)) * (i + 1)), (f"{i:04d}.txt", b"a" * 512)]
        members += [(f"{i:04d}.json", b"")]  # empty member
    return members


def write_with_tarfile(path: Path, members: list[tuple[str, bytes]], fmt: int, **kw: Any) -> Path:
    with tarfile.open(path, "w", format=fmt, **kw) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_kiln_tars_and_every_tarfile_format_read_the_same(tmp_path: Path) -> None:
    kiln_tar = tmp_path / "kiln.tar"
    kiln_tar.write_bytes(storage.tar_bytes(samples()))
    assert_same(kiln_tar)
    assert [k for _, k, _ in storage.tar_samples(str(kiln_tar))] == ["0000", "0001", "0002", "0003"]

    long_dir = "d" * 90 + "/" + "e" * 60  # over 100 bytes: a ustar prefix, or a long name
    named = [(f"{long_dir}/{n}", d) for n, d in samples()] + samples(2)
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        path = write_with_tarfile(tmp_path / f"fmt{fmt}.tar", named, fmt)
        assert_same(path)
        keys = [k for _, k, _ in storage.tar_samples(str(path))]
        assert keys[0] == f"{long_dir}/0000" and len(keys) == 6
    # ustar prefixes with no special header: read by kiln's own header parser throughout
    ustar = write_with_tarfile(tmp_path / "ustar.tar", named, tarfile.USTAR_FORMAT)
    with tarfile.open(ustar) as tar:
        assert tar.getmembers()[1].name.startswith(long_dir)

    # directories, links, a symlink among the files; members with a pax header part-way
    mixed = tmp_path / "mixed.tar"
    with tarfile.open(mixed, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in samples(2):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for kind, extra in ((tarfile.DIRTYPE, "/"), (tarfile.SYMTYPE, ".lnk")):
                other = tarfile.TarInfo(name + extra if kind == tarfile.SYMTYPE else "dir")
                other.type, other.linkname = kind, name
                tar.addfile(other)
    assert_same(mixed)
    # kiln's members, then a pax-format archive in place of the end blocks: kiln's parser
    # reads the first part, tarfile takes over at the pax header
    late = write_with_tarfile(
        tmp_path / "late.tar", [("0009.txt", b"x" * 10)], tarfile.PAX_FORMAT,
        pax_headers={"comment": "global"},
    )  # fmt: skip
    pax_late = tmp_path / "pax_late.tar"
    pax_late.write_bytes(
        b"".join(storage.tar_member(n, d) for n, d in samples(2)) + late.read_bytes()
    )
    assert_same(pax_late)
    assert [k for _, k, _ in storage.tar_samples(str(pax_late))][-1] == "0009"


@pytest.mark.parametrize("kind", [tarfile.AREGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_size_that_tarfile_ignores_is_ignored(tmp_path: Path, kind: bytes) -> None:
    """A link, or an old-style directory (a NUL-type name ending in "/"), with a size field:
    tarfile reads the next header right after it (no data follows such a header); a kiln
    member placed there is a sample."""
    inner = storage.tar_member("0005.txt", b"hi")
    info = tarfile.TarInfo("old/" if kind == tarfile.AREGTYPE else "0004.lnk")
    info.type, info.size, info.linkname = kind, len(inner), "x"
    body = info.tobuf(tarfile.GNU_FORMAT) + inner + storage.tar_member("0006.txt", b"yo")
    path = tmp_path / "t.tar"
    path.write_bytes(body + storage.tar_end(len(body)))
    assert_same(path)
    assert [k for _, k, _ in storage.tar_samples(str(path))] == ["0005", "0006"]


def test_compressed_tars_read_the_same(tmp_path: Path) -> None:
    raw = storage.tar_bytes(samples())
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(raw))
    assert_same(gz)
    assert len(list(storage.tar_samples(str(gz)))) == 4


def damaged(tmp_path: Path) -> list[Path]:
    """A kiln tar broken in every kind of place."""
    raw = storage.tar_bytes(samples(3))
    first_data = 512  # the meta member's data block
    second_header = 1024
    out = []

    def put(name: str, data: bytes) -> None:
        out.append(tmp_path / name)
        out[-1].write_bytes(data)

    put("empty.tar", b"")
    put("short_header.tar", raw[:300])
    put("only_headers_cut.tar", raw[: second_header + 100])
    bad_first = bytearray(raw)
    bad_first[10] ^= 0x41
    put("bad_first_checksum.tar", bytes(bad_first))
    bad_later = bytearray(raw)
    bad_later[second_header + 5 * 1024 + 10] ^= 0x41  # a header in the middle
    put("bad_later_checksum.tar", bytes(bad_later))
    bad_size = bytearray(raw)
    bad_size[second_header + 124 : second_header + 136] = b"99999999999\x00"  # 9 is not octal
    put("bad_size_field.tar", bytes(bad_size))
    for cut in range(first_data, len(raw), 700):  # cut inside data, headers, padding, the end
        put(f"cut_{cut}.tar", raw[:cut])
    put("no_end_blocks.tar", raw[: len(raw) - len(storage.tar_end(0))])
    put("garbage.tar", bytes(range(256)) * 4)
    return out


def test_damaged_tars_fail_or_end_where_tarfile_does(tmp_path: Path) -> None:
    paths = damaged(tmp_path)
    outcomes = set()
    for path in paths:
        assert_same(path)
        got = outcome(storage.tar_samples, str(path), None)
        outcomes.add(got if isinstance(got, str) else len(got))
    assert {"ReadError", 0, 1, 2} <= outcomes  # errors, and archives ended after 0, 1, 2 samples


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8 * 2**20])
def test_member_sizes_around_the_block(tmp_path: Path, size: int) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(
        storage.tar_bytes([("a.bin", b"\x07" * size), ("a.txt", b"t"), ("b.txt", b"")])
    )
    assert_same(path)
    (first, second) = storage.tar_samples(str(path))
    assert first[2] == {"bin": b"\x07" * size, "txt": b"t"} and second[1] == "b"


def rewrite_header(member: bytes, field: slice, value: bytes, signed: bool = False) -> bytes:
    """`member` with one header field replaced and its checksum recomputed (the signed sum
    some old tars wrote, or the standard unsigned one)."""
    block = bytearray(member[:512])
    block[field] = value
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in block)
    block[148:156] = b"%06o\x00 " % (total % 8**6 if total >= 0 else total + 8**6)
    return bytes(block) + member[512:]


def test_base256_sizes_and_signed_checksums_read_as_tarfile_reads_them(tmp_path: Path) -> None:
    data = b"z" * 700
    base256 = rewrite_header(
        storage.tar_member("0001.txt", data),
        slice(124, 136),
        b"\x80" + len(data).to_bytes(11, "big"),
    )
    signed = rewrite_header(
        storage.tar_member("0002.txt", b"s"), slice(0, 10), "0002é.txt".encode(), True
    )
    body = base256 + signed
    path = tmp_path / "t.tar"
    path.write_bytes(body + storage.tar_end(len(body)))
    assert_same(path)
    got = list(storage.tar_samples(str(path)))
    assert [(k, m) for _, k, m in got] == [("0001", {"txt": data}), ("0002é", {"txt": b"s"})]


def test_header_byte_sum_is_exact_at_the_extremes() -> None:
    """The Adler-32 shortcut for a header's checksum sum: exact up to all bytes 0xff."""
    rng = random.Random(0)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), bytes(256) + b"\xff" * 256]
    blocks += [bytes(rng.randrange(256) for _ in range(512)) for _ in range(200)]
    for block in blocks:
        assert storage._byte_sum(block) == sum(block)
