"""The layer merge: OCI semantics equal to umoci's unpacking, and hostile layers refused."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from nomad_driver.images import merge, squashfs
from tests.images.ocitools import Entry, layer_tar, sha, tree, umoci_unpack, write_layout

ROOT = os.geteuid() == 0

BASE: list[Entry] = [
    ("etc", "dir", 0o755),
    ("etc/conf", "file", b"one\n"),
    ("usr/bin", "dir", 0o755),
    ("usr/bin/tool", "file", (b"#!/bin/sh\necho tool v1\n", 0o755)),
    ("usr/bin/tool2", "hardlink", "usr/bin/tool"),
    ("usr/bin/suid", "file", (b"x", 0o4755)),
    ("bin", "symlink", "usr/bin"),
    ("abs", "symlink", "/etc/conf"),
    ("opq", "dir", 0o755),
    ("opq/a", "file", b"a"),
    ("opq/b", "file", b"b"),
    ("gone", "file", b"bye"),
    ("gonedir/x/y", "file", b"deep"),
    ("d", "dir", 0o755),
    ("d/keep", "file", b"k"),
]
UPPER: list[Entry] = [
    (".wh.gone", "file", b""),
    (".wh.gonedir", "file", b""),
    ("opq/.wh..wh..opq", "file", b""),
    ("opq/c", "file", b"c"),
    ("etc/conf", "file", b"two\n"),
    ("etc/conf-link", "hardlink", "usr/bin/tool"),
    ("d", "dir", 0o700),
]
TOP: list[Entry] = [
    ("usr/bin/tool", "file", (b"#!/bin/sh\necho tool v2\n", 0o755)),
    ("run/fifo", "fifo", None),
    ("gone", "dir", 0o755),
]


def layers_of(blobs: list[bytes]) -> list[merge.Layer]:
    return [
        merge.Layer(f"layer {i + 1}", (lambda b=blob: io.BytesIO(b)), digest=sha(blob))
        for i, blob in enumerate(blobs)
    ]


def build(tmp: Path, blobs: list[bytes]) -> Path:
    out = tmp / "image.sqsh"
    squashfs.from_tar(lambda pipe: merge.merge(layers_of(blobs), pipe), str(out))
    return out


def unpacked(image: Path, dest: Path) -> Path:
    subprocess.run(["unsquashfs", "-q", "-d", str(dest), str(image)], check=True)
    return dest


@pytest.mark.skipif(not ROOT, reason="comparing ownership needs root")
def test_merged_tree_equals_what_umoci_unpacks(tmp_path: Path) -> None:
    blobs = [layer_tar(BASE), layer_tar(UPPER), layer_tar(TOP, compress=False)]
    ours = tree(unpacked(build(tmp_path, blobs), tmp_path / "ours"))
    layout = write_layout(tmp_path / "layout", blobs)
    theirs = tree(umoci_unpack(layout, tmp_path / "bundle"))
    theirs.pop("", None)
    assert ours == theirs
    # The cases that matter, spelled out.
    assert "gone" in ours and ours["gone"][0] == "dir" and "gonedir" not in ours
    assert sorted(p for p in ours if p.startswith("opq/")) == ["opq/c"]
    assert (
        "linked-with" in ours["usr/bin/tool2"][4]
        and ours["usr/bin/tool"][4] != ours["usr/bin/tool2"][4].split()[0]
    )
    assert ours["usr/bin/suid"][1] == "0o4755"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../escape", "file", b"x")], "'../escape' climbs out of the image root"),
        ([("a/../../escape", "file", b"x")], "climbs out of the image root"),
        ([("link", "symlink", "../../etc/shadow")], "points out of the image"),
        ([("a/b/link", "symlink", "../../../x")], "points out of the image"),
        ([("h", "hardlink", "/etc/shadow")], "hard link 'h' -> 'etc/shadow': no such file"),
        ([("h", "hardlink", "../outside")], "climbs out of the image root"),
        ([("null", "chr", None)], "device node 'null' is not allowed"),
        ([("s", "symlink", "/tmp"), ("s/x", "file", b"x")], "goes through /s, a symlink"),
        ([("f", "file", b"x"), ("f/x", "file", b"x")], "goes through /f, a file"),
        ([(".wh.", "file", b"")], "names nothing"),
        ([("d/.wh..", "file", b"")], "names nothing"),
        ([(".", "symlink", "/etc")], "the image root must be a directory"),
        ([("./", "symlink", "/")], "the image root must be a directory"),
    ],
)
def test_hostile_entries_are_refused_with_layer_and_path(
    tmp_path: Path, entries: list[Entry], message: str
) -> None:
    with pytest.raises(merge.LayerError, match="layer 1") as err:
        merge.merge(layers_of([layer_tar(entries)]), io.BytesIO())
    assert message in str(err.value)


def test_a_digest_mismatch_is_refused(tmp_path: Path) -> None:
    blob = layer_tar([("f", "file", b"x")])
    bad = merge.Layer("layer 1", lambda: io.BytesIO(blob), digest=sha(blob + b"!"))
    with pytest.raises(merge.LayerError, match="digest mismatch"):
        merge.merge([bad], io.BytesIO())


def test_a_truncated_layer_is_refused(tmp_path: Path) -> None:
    blob = layer_tar([("f", "file", b"x" * 100000)])
    cut = merge.Layer("layer 1", lambda: io.BytesIO(blob[: len(blob) // 2]))
    with pytest.raises(merge.LayerError, match="layer 1"):
        merge.merge([cut], io.BytesIO())


def test_xattrs_and_zstd_layers(tmp_path: Path) -> None:
    import zstandard

    raw = layer_tar(
        [("bin/ping", "xattr", (b"p", {"security.capability": "\x01"}))], compress=False
    )
    blob = zstandard.ZstdCompressor().compress(raw)
    out = io.BytesIO()
    merge.merge(layers_of([blob]), out)
    import tarfile

    out.seek(0)
    members = {m.name: m for m in tarfile.open(fileobj=out)}
    assert "SCHILY.xattr.security.capability" in members["bin/ping"].pax_headers


EDGE_LAYERS: list[list[Entry]] = [
    [
        ("f", "file", b"old f\n"),
        ("h", "hardlink", "f"),  # same layer as f; f is replaced two layers up
        ("g", "file", b"g1"),
        ("dir2file/x", "file", b"under a dir that becomes a file"),
        ("file2dir", "file", b"a file that becomes a dir"),
        ("lnkdir/y", "file", b"under a dir that becomes a symlink"),
        ("back", "dir", 0o755),
        ("back/z", "file", b"whited out, then back"),
    ],
    [
        # Whiteouts first, as image builders write them (umoci needs that order).
        (".wh.back", "file", b""),
        (".wh.file2dir", "file", b""),
        (".wh.lnkdir", "file", b""),
        (".wh.dir2file", "file", b""),
        ("h1", "hardlink", "g"),
        ("back/new", "file", b"new"),
        ("dir2file", "file", b"now a file"),
        ("file2dir/inside", "file", b"now a dir"),
        ("lnkdir", "symlink", "/tmp"),
    ],
    [("h2", "hardlink", "h1")],
    [("f", "file", b"new f\n"), ("g", "file", b"g2")],
]


@pytest.mark.skipif(not ROOT, reason="comparing ownership needs root")
def test_edge_cases_of_a_single_top_down_pass_match_umoci(tmp_path: Path) -> None:
    blobs = [layer_tar(layer) for layer in EDGE_LAYERS]
    ours = tree(unpacked(build(tmp_path, blobs), tmp_path / "ours"))
    theirs = tree(umoci_unpack(write_layout(tmp_path / "layout", blobs), tmp_path / "bundle"))
    assert ours == theirs
    assert ours["h"][4].startswith(ours["f"][4]) is False  # h kept the old content
    assert ours["h1"][4].split()[0] == ours["h2"][4].split()[0] != ours["g"][4].split()[0]


def test_the_meter_sees_every_byte_of_every_layer(tmp_path: Path) -> None:
    blobs = [layer_tar([("a", "file", os.urandom(300000))]), layer_tar([("b", "file", b"b")])]
    layers = [
        merge.Layer(f"layer {i}", (lambda b=b: io.BytesIO(b)), digest=sha(b), size=len(b))
        for i, b in enumerate(blobs)
    ]
    seen: dict[str, tuple[int, int]] = {}
    merge.merge(
        layers, io.BytesIO(), meter=lambda label, done, total: seen.update({label: (done, total)})
    )
    assert seen == {f"layer {i}": (len(b), len(b)) for i, b in enumerate(blobs)}


@pytest.fixture(params=["isal", "zlib"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each gzip decoder the merge may use: python-isal's threaded one, or zlib without it."""
    if request.param == "isal":
        pytest.importorskip("isal.igzip_threaded")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)  # import isal fails: the fallback
    return str(request.param)


def layer_with_ids(blob: bytes, diff_id: str = "") -> merge.Layer:
    """A gzip layer whose digest and uncompressed digest (the hashing thread's) are checked."""
    return merge.Layer(
        "layer 1",
        lambda: io.BytesIO(blob),
        digest=sha(blob),
        diff_id=diff_id or sha(gzip.decompress(blob)),
    )


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since before, still alive (others, e.g. an earlier test's, not counted)."""
    return [t.name for t in threading.enumerate() if t not in before]


def test_both_digests_are_checked_with_either_decoder(decoder: str) -> None:
    before = set(threading.enumerate())
    blob = layer_tar([("f", "file", os.urandom(3 << 20)), ("g", "file", b"small")])
    out = io.BytesIO()
    assert merge.merge([layer_with_ids(blob)], out) == 2
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as merged:
        assert sorted(merged.getnames()) == ["f", "g"]
    wrong = layer_with_ids(blob, diff_id=sha(b"other"))
    with pytest.raises(merge.LayerError, match="uncompressed content does not match"):
        merge.merge([wrong], io.BytesIO())
    assert new_threads(before) == []


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "hostile"])
def test_a_refused_layer_leaves_no_thread_or_traceback(decoder: str, damage: str) -> None:
    """The decoder's and the hasher's threads end with the layer, however it ends: a plugin
    refusing one bad image after another must not pile them up."""
    before = set(threading.enumerate())
    # Refused at its first entry, the hostile layer leaves the decoder with 16 MB still to give.
    entries: list[Entry] = [("big", "file", os.urandom(16 << 20)), ("next", "file", b"x")]
    if damage == "hostile":
        entries.insert(0, ("../escape", "file", b"x"))
    blob = layer_tar(entries)
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "corrupt":
        middle = len(blob) // 2
        blob = (
            blob[:middle]
            + bytes(b ^ 0x5A for b in blob[middle : middle + 4096])
            + blob[middle + 4096 :]
        )
    layer = merge.Layer("layer 1", lambda: io.BytesIO(blob), digest=sha(blob),
                        diff_id=sha(b"unknown"))  # fmt: skip
    with pytest.raises(merge.LayerError, match="layer 1"):
        merge.merge([layer], io.BytesIO())
    deadline = time.monotonic() + 5
    while new_threads(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert new_threads(before) == []


def raw_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"x", **pax: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
    info.pax_headers = dict(pax)
    return info, data


class Capped(io.BytesIO):
    """An output that refuses more than 64 MB."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > 64 << 20:
            raise OSError("more than 64 MB written")
        return super().write(data)


def blocks(name: str) -> bytes:
    """One member's header and data blocks, without the archive's end."""
    info, data = member(name)
    return info.tobuf(tarfile.PAX_FORMAT) + data.ljust(tarfile.BLOCKSIZE, b"\0")


def sparse_member() -> bytes:
    """A PAX 1.0 sparse file of 10 KB on the wire claiming 1 PiB of holes."""
    info, _ = member("sparse", b"")
    info.size = 512  # the sparse map block
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": str(1 << 50),
    }
    return raw_tar([(info, b"1\n0\n0\n".ljust(512, b"\0"))])


# (what the layer tries, the layer's bytes, what the refusal says)
HOSTILE_HEADERS = {
    "a 64 MB PAX header held in memory": (
        lambda: raw_tar([member("f", comment="A" * (64 << 20))]),
        "a tar header of",
    ),
    "a 64 MB GNU long name": (
        lambda: raw_tar([member("d/" + "n" * (64 << 20))], fmt=tarfile.GNU_FORMAT),
        "a tar header of",
    ),
    "a name longer than PATH_MAX": (lambda: raw_tar([member("n" * 5000)]), "a name of 5000"),
    "a NUL byte that cuts the name short for tar2sqfs": (
        lambda: raw_tar([member("secret", b"resurrected", path="secret\0z")]),
        "holds a NUL byte",
    ),
    "a sparse file of 1 PiB in 10 KB": (sparse_member, "is a sparse file"),
    "an infinite modification time": (lambda: raw_tar([member("f", mtime="inf")]), "time inf"),
    "a NaN modification time": (lambda: raw_tar([member("f", mtime="nan")]), "time nan"),
    "a uid beyond 32 bits": (lambda: raw_tar([member("f", uid=str(10**30))]), "has uid"),
    "a garbage block hiding the members after it": (
        lambda: blocks("a") + b"\x01" * 512 + blocks("b") + bytes(1024),
        "not a tar header at byte 1024",
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_in_bounded_memory_naming_the_layer(attack: str) -> None:
    build, message = HOSTILE_HEADERS[attack]
    blob = gzip.compress(build(), mtime=0)
    layer = merge.Layer("layer 1", lambda: io.BytesIO(blob), digest=sha(blob))
    with pytest.raises(merge.LayerError, match="^layer 1: ") as err:
        merge.merge([layer], Capped())  # a merge that would write on fails, not the machine
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    # The control: the same kinds of member, ordinary, merge.
    plain = gzip.compress(raw_tar([member("a"), member("f", b"y" * 5000, comment="ok")]))
    ok = merge.Layer("layer 1", lambda: io.BytesIO(plain), digest=sha(plain))
    assert merge.merge([ok], io.BytesIO()) == 2


def test_a_layer_read_twice_is_checked_the_second_time_too() -> None:
    """A hard link to a file a higher layer replaced makes the merge read the lower layer
    again: bytes that change between the two reads must meet the digest as the first did."""
    lower = layer_tar([("a", "file", b"ORIGINAL"), ("b", "hardlink", "a"), ("z", "file", b"z")])
    upper = layer_tar([("a", "file", b"replaced")])
    swapped = layer_tar([("a", "file", b"EVIL-BYT"), ("b", "hardlink", "a"), ("z", "file", b"z")])
    for second, refused in ((lower, False), (swapped, True)):
        served = iter([lower, second])
        layers = [
            merge.Layer("layer 1", lambda s=served: io.BytesIO(next(s)), digest=sha(lower)),
            merge.Layer("layer 2", lambda: io.BytesIO(upper), digest=sha(upper)),
        ]
        out = io.BytesIO()
        if refused:
            with pytest.raises(merge.LayerError, match="layer 1: digest mismatch"):
                merge.merge(layers, out)
        else:
            merge.merge(layers, out)
            with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as merged:
                data = merged.extractfile("b")
                assert data is not None and data.read() == b"ORIGINAL"


def ext(kind: bytes, data: bytes) -> bytes:
    """An extended header block of tar type kind (x, g: PAX; L: GNU long name) holding data."""
    info = tarfile.TarInfo("././@ext")
    info.type, info.size = kind, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data.ljust(-(-len(data) // 512) * 512, b"\0")


def record(key: str, value: str) -> bytes:
    """One PAX record, its length prefix counting itself."""
    body = f" {key}={value}\n".encode()
    size = len(body) + 1
    while len(str(size)) + len(body) != size:
        size += 1
    return str(size).encode() + body


def end() -> bytes:
    return bytes(1024)


# (what the layer does, its bytes, what the refusal says); found by the second import red team
READER_DISAGREEMENTS = {
    "a PAX header of digits (hours in Python 3.11's parser)": (
        lambda: ext(b"x", b"1" * 160000) + blocks("f") + end(),
        "malformed PAX header",
    ),
    "a well-formed PAX record holding a long run of digits": (
        lambda: ext(b"x", record("comment", "1" * 5000)) + blocks("f") + end(),
        "run of more than 64 digits",
    ),
    "global PAX headers piling up past 1 MiB": (
        lambda: b"".join(ext(b"g", record(f"c{i}", "a" * 600000)) + blocks(f"f{i}")
                         for i in range(4)) + end(),
        "global PAX headers of over",
    ),
    "a chain of 3000 PAX headers (recursion in tarfile)": (
        lambda: ext(b"x", record("comment", "a")) * 3000 + blocks("f") + end(),
        "a PAX header after PAX headers",
    ),
    "a PAX path and a GNU long name for one member": (
        lambda: ext(b"x", record("path", "harmless")) + ext(b"L", b".wh.secret\0") + blocks("x")
        + end(),
        "GNU long name header after PAX",
    ),
    "a file twice in one layer (first or last copy wins, by reader)": (
        lambda: blocks("etc/motd") + blocks("etc/motd") + end(),
        "appears twice",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(READER_DISAGREEMENTS))
def test_headers_tar_readers_disagree_on_are_refused(case: str) -> None:
    build, message = READER_DISAGREEMENTS[case]
    blob = gzip.compress(build(), mtime=0)
    layer = merge.Layer("layer 1", lambda: io.BytesIO(blob), digest=sha(blob))
    started = time.monotonic()
    with pytest.raises(merge.LayerError, match="^layer 1: ") as err:
        merge.merge([layer], Capped())
    assert message in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 5
    # Controls: one PAX header, one global header, a GNU long name alone, each file once.
    plain = gzip.compress(
        ext(b"g", record("comment", "1700000000")) + ext(b"x", record("path", "a" * 300))
        + blocks("x") + ext(b"L", b"b" * 300 + b"\0") + blocks("y") + blocks("etc/motd") + end()
    )  # fmt: skip
    ok = merge.Layer("layer 1", lambda: io.BytesIO(plain), digest=sha(plain))
    out = io.BytesIO()
    assert merge.merge([ok], out) == 3
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as merged:
        assert sorted(merged.getnames()) == ["a" * 300, "b" * 300, "etc/motd"]


def test_a_hard_link_to_itself_is_refused_not_a_deletion() -> None:
    lower = layer_tar([("etc/passwd", "file", b"root:x:0:0\n")])
    upper = layer_tar([("etc/passwd", "hardlink", "etc/passwd")])
    layers = [
        merge.Layer("layer 1", lambda: io.BytesIO(lower), digest=sha(lower)),
        merge.Layer("layer 2", lambda: io.BytesIO(upper), digest=sha(upper)),
    ]
    with pytest.raises(merge.LayerError, match="layer 2: hard link 'etc/passwd' points to itself"):
        merge.merge(layers, io.BytesIO())
    control = layer_tar([("other", "hardlink", "etc/passwd")])
    layers[1] = merge.Layer("layer 2", lambda: io.BytesIO(control), digest=sha(control))
    assert merge.merge(layers, io.BytesIO()) == 2


def test_only_user_xattrs_and_file_capabilities_reach_the_image() -> None:
    """trusted.* (overlayfs' own opaque and redirect marks), other security.* labels and
    names with control characters are dropped; user.* and security.capability kept."""
    info, data = member("f", b"x")
    info.pax_headers = {
        "SCHILY.xattr.user.note": "kept",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.security.selinux": "system_u:object_r:shadow_t:s0",
        "SCHILY.xattr.user.a\nb": "x",
    }
    blob = raw_tar([(info, data)])
    out = io.BytesIO()
    merge.merge([merge.Layer("layer 1", lambda: io.BytesIO(blob), digest=sha(blob))], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as merged:
        kept = {k for k in merged.getmember("f").pax_headers if k.startswith("SCHILY.xattr.")}
    assert kept == {"SCHILY.xattr.user.note", "SCHILY.xattr.security.capability"}
