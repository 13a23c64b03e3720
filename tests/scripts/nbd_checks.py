#!/usr/bin/env python3
"""Protocol checks driven through libnbd's Python bindings (python3-libnbd, what nbdsh runs).

Each subcommand connects to a running server by URI, checks one area of the protocol, prints
what it saw, and exits 0 when every check passed or 1 with a FAIL line naming the first that
did not. The Rust tests in tests/nbdsh.rs start the server and call these; by hand:

    python3 tests/scripts/nbd_checks.py errors nbd://127.0.0.1:10809

Written against libnbd 1.14 (Debian 12); newer bindings add APIs that are used when present.
"""

import argparse
import errno
import os
import random
import sys
import threading
import time

import nbd

MIB = 1 << 20


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def connect(uri, meta=False, strict=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


def expect_error(what, fn, allowed):
    """Runs fn, which must fail with one of the errno names in `allowed`."""
    try:
        fn()
    except nbd.Error as e:
        check(
            e.errno in allowed,
            f"{what}: failed with {e.errno} ({e.string}), expected {' or '.join(allowed)}",
        )
        print(f"ok: {what} -> {e.errno}")
        return e.errno
    fail(f"{what}: succeeded, expected {' or '.join(allowed)}")


def pattern(seed, length):
    """Deterministic bytes that differ from block to block and from seed to seed."""
    block = bytes((seed * 31 + i * 7) % 251 for i in range(4096))
    reps = length // len(block) + 1
    return (block * reps)[:length]


def assert_usable(h, what):
    """The connection still answers reads and writes after an error reply."""
    h.pwrite(b"\x5a" * 4096, 0)
    check(
        h.pread(4096, 0) == b"\x5a" * 4096,
        f"after {what}: the connection no longer reads back what it wrote",
    )


# --- option haggling -------------------------------------------------------------------------


def cmd_options(args):
    """opt_list, opt_info, opt_go with a named export, an unknown export refused, meta contexts."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(args.uri)
    check(h.aio_is_negotiating(), "option mode: handle is not negotiating after connect")

    names = []
    n = h.opt_list(lambda name, desc: names.append(name) or 0)
    print(f"opt_list: {names}")
    check(n == len(names), f"opt_list returned {n} but called back {len(names)} times")
    for name in args.names:
        check(name in names, f"opt_list does not list export '{name}': {names}")
    for name in names:
        check(name in args.names or name == "", f"opt_list lists unknown export '{name}'")

    # opt_info on each named export reports its size, and the connection stays negotiating.
    for name, size in zip(args.names, args.sizes):
        h.set_export_name(name)
        h.opt_info()
        check(h.get_size() == size, f"opt_info '{name}': size {h.get_size()}, expected {size}")
        check(not h.is_read_only(), f"opt_info '{name}': read-only")
        print(f"opt_info '{name}': size {h.get_size()}")
    check(h.aio_is_negotiating(), "opt_info ended negotiation")

    # An unknown export is refused with an error reply, not a dropped connection.
    h.set_export_name("no-such-export")
    expect_error("opt_info on unknown export", h.opt_info, ["ENOENT", "EINVAL", "EPERM"])
    check(h.aio_is_negotiating(), "refusing an unknown export ended negotiation")

    # Meta contexts: base:allocation is offered, an unknown namespace is not.
    contexts = []
    h.set_export_name(args.names[0])
    h.opt_list_meta_context(lambda ctx: contexts.append(ctx) or 0)
    print(f"opt_list_meta_context: {contexts}")
    check(nbd.CONTEXT_BASE_ALLOCATION in contexts, f"base:allocation not offered: {contexts}")
    h.add_meta_context("x-no-such-namespace:thing")
    only = []
    h.opt_list_meta_context(lambda ctx: only.append(ctx) or 0)
    print(f"opt_list_meta_context for an unknown namespace: {only}")
    check(only == [], f"a query for an unknown namespace returned {only}")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    both = []
    h.opt_list_meta_context(lambda ctx: both.append(ctx) or 0)
    print(f"opt_list_meta_context for it and base:allocation: {both}")
    check(both == [nbd.CONTEXT_BASE_ALLOCATION], f"a query for two contexts returned {both}")
    h.clear_meta_contexts()
    if hasattr(h, "opt_set_meta_context"):  # libnbd >= 1.16
        got = []
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        n = h.opt_set_meta_context(lambda ctx: got.append(ctx) or 0)
        check(got == [nbd.CONTEXT_BASE_ALLOCATION], f"opt_set_meta_context: {got}")
        h.clear_meta_contexts()

    # opt_go on the second export, with base:allocation requested.
    target = args.names[-1]
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(target)
    h.opt_go()
    check(h.aio_is_ready(), "opt_go did not enter transmission")
    check(h.get_size() == args.sizes[-1], f"opt_go '{target}': size {h.get_size()}")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    h.pwrite(b"named", 0)
    check(h.pread(5, 0) == b"named", "named export does not read back")
    h.shutdown()

    # A client that only asks for an unknown context gets none, and can still do I/O.
    h = nbd.NBD()
    h.add_meta_context("x-no-such-namespace:thing")
    h.connect_uri(args.uri)
    check(not h.can_meta_context("x-no-such-namespace:thing"), "unknown context negotiated")
    check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "unrequested context negotiated")
    h.pread(512, 0)
    h.shutdown()

    # Connecting straight to an unknown export fails cleanly.
    expect_error("connect to unknown export",
                 lambda: nbd.NBD().connect_uri(args.unknown_uri), ["ENOENT", "EINVAL", "EPERM"])
    # NBD_OPT_ABORT ends negotiation without entering transmission.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(args.uri)
    h.opt_abort()
    check(h.aio_is_closed(), "opt_abort did not close")
    print("options: all checks passed")


# --- block status and structured reads -------------------------------------------------------


def extents_of(h, length, offset, flags=0):
    got = []

    def cb(ctx, off, entries, err):
        check(ctx == nbd.CONTEXT_BASE_ALLOCATION, f"extent callback for context {ctx}")
        check(off == offset, f"extent callback offset {off}, asked {offset}")
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def state_at(extents, start, pos):
    """The flags of the extent covering `pos`, given extents that begin at `start`."""
    off = start
    for length, flags in extents:
        if off <= pos < off + length:
            return flags
        off += length
    return None


def cmd_block_status(args):
    """Holes vs data in base:allocation, with and without REQ_ONE."""
    h = connect(args.uri, meta=True)
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    size = h.get_size()
    a = args.align
    # Fresh device: everything is a hole that reads as zeros.
    ext = extents_of(h, size, 0)
    print(f"fresh: {ext[:8]}")
    check(ext and all(f == nbd.STATE_HOLE | nbd.STATE_ZERO for _, f in ext),
          f"fresh device is not all hole+zero: {ext[:8]}")
    check(sum(l for l, _ in ext) <= size, "extents run past the requested range")

    # Data at [2a, 4a): data there, holes around it.
    h.pwrite(pattern(1, 2 * a), 2 * a)
    ext = extents_of(h, 8 * a, 0)
    print(f"after write at [{2 * a}, {4 * a}): {ext}")
    covered = sum(l for l, _ in ext)
    check(0 < covered <= 8 * a, f"extents cover {covered} bytes of {8 * a}")
    for pos in range(0, min(covered, 8 * a), a // 2):
        flags = state_at(ext, 0, pos)
        if 2 * a <= pos < 4 * a:
            check(flags & nbd.STATE_HOLE == 0, f"written byte {pos} reported as a hole ({flags})")
            check(flags & nbd.STATE_ZERO == 0, f"written byte {pos} reported as zero ({flags})")
        else:
            check(flags == nbd.STATE_HOLE | nbd.STATE_ZERO,
                  f"unwritten byte {pos} reported as {flags}, expected hole+zero")
    check(covered >= 4 * a, f"extents stop at {covered}, before the data at {2 * a} ended")

    # REQ_ONE: exactly one extent, starting where asked, no longer than asked.
    for off, want_hole in [(0, True), (2 * a, False), (3 * a, False), (5 * a, True)]:
        one = extents_of(h, 2 * a, off, nbd.CMD_FLAG_REQ_ONE)
        print(f"REQ_ONE at {off}: {one}")
        check(len(one) == 1, f"REQ_ONE at {off} returned {len(one)} extents")
        length, flags = one[0]
        check(0 < length <= 2 * a, f"REQ_ONE at {off}: length {length}")
        check(bool(flags & nbd.STATE_HOLE) == want_hole, f"REQ_ONE at {off}: flags {flags}")
    # The one extent ends at the data/hole boundary.
    one = extents_of(h, 8 * a, 3 * a, nbd.CMD_FLAG_REQ_ONE)
    check(one[0][0] == a, f"REQ_ONE at {3 * a} should end at {4 * a}: {one}")

    # Trimming the data makes it a hole again.
    h.trim(2 * a, 2 * a)
    ext = extents_of(h, 8 * a, 0)
    print(f"after trim: {ext}")
    check(all(f == nbd.STATE_HOLE | nbd.STATE_ZERO for _, f in ext), f"trimmed range: {ext}")

    # The last byte, and a range reaching the end, are fine.
    one = extents_of(h, 1, size - 1)
    check(one and one[0][0] >= 1, f"block status of the last byte: {one}")
    h.shutdown()
    print("block-status: all checks passed")


def structured_read(h, count, offset, flags=0):
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, len(buf), status, bytes(buf) if status == nbd.READ_DATA else None))
        return 0

    data = h.pread_structured(count, offset, cb, flags)
    return bytes(data), chunks


def check_tiling(chunks, offset, count, what):
    """Content chunks cover [offset, offset + count) exactly once."""
    spans = sorted((off, length) for off, length, status, _ in chunks if status != nbd.READ_ERROR)
    pos = offset
    for off, length in spans:
        check(length > 0, f"{what}: empty chunk at {off}")
        check(off == pos, f"{what}: chunks leave a gap or overlap at {pos} (next chunk at {off})")
        pos += length
    check(pos == offset + count, f"{what}: chunks end at {pos}, request ends at {offset + count}")


def cmd_structured_read(args):
    """pread_structured: chunks tile the request, data chunks carry data, holes read as zeros."""
    h = connect(args.uri)
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    a = args.align
    data = pattern(2, a)
    h.pwrite(data, 2 * a)
    h.pwrite(b"\xff" * 4096, 5 * a + 12345)
    expected = bytearray(8 * a)
    expected[2 * a:3 * a] = data
    expected[5 * a + 12345:5 * a + 12345 + 4096] = b"\xff" * 4096
    expected = bytes(expected)

    for off, count in [(0, 8 * a), (a + 1, 3 * a - 2), (5 * a, a), (7 * a, a), (2 * a + 17, 100)]:
        buf, chunks = structured_read(h, count, off)
        what = f"read [{off}, {off + count})"
        print(f"{what}: {[(o, l, s) for o, l, s, _ in chunks]}")
        check(buf == expected[off:off + count], f"{what}: wrong data")
        check_tiling(chunks, off, count, what)
        for coff, length, status, payload in chunks:
            check(status in (nbd.READ_DATA, nbd.READ_HOLE), f"{what}: chunk status {status}")
            want = expected[coff:coff + length]
            if status == nbd.READ_DATA:
                check(payload == want, f"{what}: data chunk at {coff} has wrong bytes")
            else:
                check(want == bytes(length), f"{what}: hole chunk at {coff} covers data")
        if args.expect_holes and off == 7 * a:
            check(all(s == nbd.READ_HOLE for _, _, s, _ in chunks),
                  f"{what}: an unwritten chunk came back as data, not as a hole")
    if args.expect_holes:
        _, chunks = structured_read(h, 8 * a, 0)
        holes = sum(l for _, l, s, _ in chunks if s == nbd.READ_HOLE)
        check(holes >= 4 * a, f"only {holes} bytes of holes in a mostly unwritten range")

    if h.can_df():
        # DF: one content chunk, data and hole together, holes as explicit zeros.
        off, count = 3 * a - 32768, 65536
        buf, chunks = structured_read(h, count, off, nbd.CMD_FLAG_DF)
        print(f"DF read [{off}, {off + count}): {[(o, l, s) for o, l, s, _ in chunks]}")
        check(buf == expected[off:off + count], "DF read: wrong data")
        check(len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA,
              f"DF read across data and hole: {len(chunks)} chunks")
    h.shutdown()
    print("structured-read: all checks passed")


# --- errors ----------------------------------------------------------------------------------


def cmd_errors(args):
    """Error replies for bad ranges, each followed by working I/O on the same connection."""
    h = connect(args.uri, meta=True, strict=0)
    size = h.get_size()
    check(h.get_strict_mode() == 0, "strict mode still on")

    expect_error("pread past the end", lambda: h.pread(512, size), ["EINVAL"])
    assert_usable(h, "pread past the end")
    expect_error("pread straddling the end", lambda: h.pread(1024, size - 512), ["EINVAL"])
    assert_usable(h, "pread straddling the end")
    expect_error("pread far past the end", lambda: h.pread(4096, 1 << 62), ["EINVAL"])
    assert_usable(h, "pread far past the end")
    # The spec: "The server SHOULD return ENOSPC if it receives a write request including
    # one or more sectors beyond the size of the device."
    expect_error("pwrite past the end", lambda: h.pwrite(b"x" * 512, size), ["ENOSPC"])
    assert_usable(h, "pwrite past the end")
    expect_error("pwrite straddling the end", lambda: h.pwrite(b"x" * 1024, size - 512),
                 ["ENOSPC"])
    assert_usable(h, "pwrite straddling the end")
    check(h.pread(512, size - 512) != b"x" * 512, "a refused write changed the last block")
    expect_error("pwrite whose end overflows 64 bits",
                 lambda: h.pwrite(b"x" * 4096, (1 << 64) - 2048), ["ENOSPC", "EINVAL"])
    assert_usable(h, "pwrite overflowing")
    expect_error("zero past the end", lambda: h.zero(4096, size), ["ENOSPC", "EINVAL"])
    assert_usable(h, "zero past the end")
    expect_error("trim past the end", lambda: h.trim(4096, size), ["EINVAL", "ENOSPC"])
    assert_usable(h, "trim past the end")
    expect_error("block status past the end",
                 lambda: h.block_status(4096, size, lambda *a: 0), ["EINVAL"])
    assert_usable(h, "block status past the end")
    if h.can_cache():
        expect_error("cache past the end", lambda: h.cache(4096, size), ["EINVAL"])
        assert_usable(h, "cache past the end")
    # Requests that end exactly at the end are fine.
    h.pwrite(b"e" * 512, size - 512)
    check(h.pread(512, size - 512) == b"e" * 512, "last block does not read back")
    h.shutdown()
    print("errors: all checks passed")


def cmd_read_only(args):
    """A read-only export refuses every change with EPERM and keeps serving reads."""
    h = connect(args.uri, strict=0)
    check(h.is_read_only(), "export not advertised read-only")
    check(not h.can_trim() and not h.can_zero(), "read-only export offers trim or zero")
    before = h.pread(4096, 0)
    expect_error("pwrite on read-only", lambda: h.pwrite(b"w" * 4096, 0), ["EPERM"])
    check(h.pread(4096, 0) == before, "refused write changed data")
    expect_error("zero on read-only", lambda: h.zero(4096, 0), ["EPERM", "EINVAL"])
    expect_error("trim on read-only", lambda: h.trim(4096, 0), ["EPERM", "EINVAL"])
    check(h.pread(4096, 0) == before, "connection unusable after refused writes")
    h.flush()
    h.shutdown()
    print("read-only: all checks passed")


# --- flags -----------------------------------------------------------------------------------


def cmd_flags(args):
    """multi-conn, FUA writes, FAST_ZERO, flush and cache on a writable export."""
    h = connect(args.uri)
    check(h.can_multi_conn(), "can_multi_conn is false")
    check(h.can_fua(), "can_fua is false")
    check(h.can_flush(), "can_flush is false")
    check(h.can_fast_zero(), "can_fast_zero is false")
    check(h.can_zero() and h.can_trim(), "zero or trim missing")
    data = pattern(3, MIB)
    h.pwrite(data, 3 * MIB + 100, nbd.CMD_FLAG_FUA)
    check(h.pread(MIB, 3 * MIB + 100) == data, "FUA write does not read back")
    h.zero(MIB, 3 * MIB + 100, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(MIB, 3 * MIB + 100) == bytes(MIB), "FAST_ZERO did not zero")
    h.pwrite(data, 0)
    h.zero(65536, 4096, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    got = h.pread(MIB, 0)
    check(got[:4096] == data[:4096] and got[4096:69632] == bytes(65536)
          and got[69632:] == data[69632:], "zero with NO_HOLE|FAST_ZERO|FUA: wrong bytes")
    h.flush()
    if h.can_cache():
        h.cache(MIB, 0)
    # A second connection sees what the first wrote and flushed (what multi-conn promises).
    h2 = connect(args.uri)
    check(h2.pread(MIB, 0) == got, "second connection sees different data")
    h2.pwrite(b"\x11" * 4096, 0, nbd.CMD_FLAG_FUA)
    h2.flush()
    check(h.pread(4096, 0) == b"\x11" * 4096, "first connection misses the second's write")
    h2.shutdown()
    h.shutdown()
    print("flags: all checks passed")


# --- many connections ------------------------------------------------------------------------


def cmd_concurrent(args):
    """N connections at once, each writing its own pattern to its own range, then all checked."""
    n, span = args.connections, args.span
    handles = [connect(args.uri) for _ in range(n)]
    start = threading.Barrier(n)
    errors = []

    def worker(i):
        try:
            h = handles[i]
            data = pattern(i + 7, span)
            start.wait(timeout=60)
            piece = 65536
            for off in range(0, span, piece):
                h.pwrite(data[off:off + piece], i * span + off)
            h.flush()
            check(h.pread(span, i * span) == data, f"connection {i} reads back wrong data")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"connection {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "; ".join(errors[:5]))
    print(f"{n} connections wrote {n * span >> 20} MiB in {time.monotonic() - t0:.2f} s")
    for h in handles:
        h.shutdown()
    # A fresh connection sees every range intact: no write landed in another's range.
    h = connect(args.uri)
    for i in range(n):
        check(h.pread(span, i * span) == pattern(i + 7, span), f"range {i} is corrupt")
    h.shutdown()
    print("concurrent: all checks passed")


def stamped(seed, off, length):
    """pattern(seed) with every 4 KiB piece led by its own offset and the seed, so a write
    that lands in the wrong place or an old version shows as a mismatch."""
    data = bytearray(pattern(seed, length))
    for k in range(0, length, 4096):
        data[k:k + 16] = (off + k).to_bytes(8, "little") + seed.to_bytes(8, "little")
    return bytes(data)


def cmd_verify_load(args):
    """N connections, each owning a region, write, zero and trim it at random and check every
    read against their model, until the file --stop exists (or --seconds pass)."""
    n, span, block = args.connections, args.span, args.block
    errors, counts = [], [0] * n
    deadline = time.monotonic() + args.seconds

    def stopped():
        return os.path.exists(args.stop) or time.monotonic() > deadline

    def worker(i):
        try:
            h = connect(args.uri)
            rng = random.Random(i * 7919 + 1)
            blocks = span // block
            model = [0] * blocks  # 0: zeroes, else the seed of the pattern written there
            version = 0
            while not stopped():
                b = rng.randrange(blocks)
                off = i * span + b * block
                op = rng.randrange(6)
                if op <= 2:
                    version += 1
                    seed = (i << 32) | version
                    h.pwrite(stamped(seed, off, block), off)
                    model[b] = seed
                elif op == 3:
                    h.zero(block, off)
                    model[b] = 0
                elif op == 4:
                    h.trim(block, off)
                    model[b] = 0
                want = bytes(block) if model[b] == 0 else stamped(model[b], off, block)
                check(h.pread(block, off) == want, f"connection {i}: block {b} reads back wrong data")
                counts[i] += 1
            # A final pass over the whole region.
            for b in range(blocks):
                off = i * span + b * block
                want = bytes(block) if model[b] == 0 else stamped(model[b], off, block)
                check(h.pread(block, off) == want,
                      f"connection {i}: block {b} wrong in the final pass")
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"connection {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    print("verify-load: started", flush=True)
    for t in threads:
        t.join()
    check(not errors, "; ".join(errors[:5]))
    print(f"verify-load: {sum(counts)} verified operations, 0 mismatches", flush=True)


# --- a client killed mid-flight --------------------------------------------------------------


def cmd_flood(args):
    """Keeps many 1 MiB writes in flight below --span until killed; prints FLOODING once they
    flow. Writes the server took in before the kill may still land after it: others keep out
    of this range."""
    h = connect(args.uri)
    span = min(h.get_size(), args.span)
    buf = nbd.Buffer.from_bytearray(bytearray(pattern(9, MIB)))
    done = 0
    off = 0
    announced = False
    try:
        while True:
            while h.aio_in_flight() < args.depth:
                h.aio_pwrite(buf, off)
                off = (off + MIB) % (span - MIB)
            h.poll(-1)
            while h.aio_peek_command_completed() > 0:
                cookie = h.aio_peek_command_completed()
                h.aio_command_completed(cookie)
                done += 1
            if done >= args.depth and not announced:
                print("FLOODING", flush=True)
                announced = True
    except nbd.Error as e:
        # How a flood ends: the server goes away under it. Exit non-zero all the same.
        print(f"flood ended after {done} writes: {e.errno}: {e.string}", flush=True)
        sys.exit(1)


def cmd_hold(args):
    """Connects, prints CONNECTED, then waits for the server to go away; reports how it ended."""
    h = connect(args.uri)
    h.pread(512, 0)
    print("CONNECTED", flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            h.pread(512, 0)
        except nbd.Error as e:
            print(f"DISCONNECTED: {e.errno} {e.string}", flush=True)
            return
        time.sleep(0.05)
    fail(f"the server kept the connection for {args.seconds} s")


def cmd_write_verify(args):
    """Writes a pattern over [offset, offset + length), flushes, reads it back on a new connection."""
    data = pattern(args.seed, args.length)
    h = connect(args.uri)
    piece = 4 * MIB
    for off in range(0, args.length, piece):
        h.pwrite(data[off:off + piece], args.offset + off)
    h.flush()
    h.shutdown()
    h = connect(args.uri)
    for off in range(0, args.length, piece):
        got = h.pread(min(piece, args.length - off), args.offset + off)
        check(got == data[off:off + piece], f"range at {args.offset + off} does not read back")
    h.shutdown()
    print(f"write-verify: {args.length} bytes at {args.offset} verified")


# --- large requests --------------------------------------------------------------------------


def cmd_large_requests(args):
    """One write and one read of --length bytes (above the 32 MiB the server advertises), as a
    client never told any limit (NBD_OPT_EXPORT_NAME) or one that was and sends them anyway:
    the data reads back whole, also in small pieces."""
    h = nbd.NBD()
    if args.mode == "export-name":
        # Without fixed newstyle, libnbd sends NBD_OPT_EXPORT_NAME and learns no block sizes.
        h.set_handshake_flags(0)
    else:
        h.set_request_structured_replies(args.mode == "structured")
    h.connect_uri(args.uri)
    check(h.get_size() >= args.offset + args.length, "export too small for this check")
    if args.mode != "export-name":
        check(h.get_block_size(nbd.SIZE_MAXIMUM) < args.length,
              "the request is not above the advertised maximum payload")
    check(h.get_structured_replies_negotiated() == (args.mode == "structured"),
          "structured replies negotiated other than asked")
    data = pattern(args.seed, args.length)
    h.pwrite(data, args.offset)
    check(h.pread(args.length, args.offset) == data, "the large read differs from the write")
    # Small reads on a new connection: pieces of the large write landed where they belong.
    h.shutdown()
    h = connect(args.uri)
    for off in range(0, args.length, 4 * MIB):
        got = h.pread(min(4 * MIB, args.length - off), args.offset + off)
        check(got == data[off:off + 4 * MIB], f"range at {args.offset + off} does not read back")
    h.shutdown()
    print(f"large-requests ({args.mode}): {args.length} bytes at {args.offset} verified")


# --- memory cap ------------------------------------------------------------------------------


def cmd_memory_cap(args):
    """With --max-memory CAP and --chunk-size CHUNK: writes fill the cap, the next chunk gets
    ENOSPC without harm, and trimming frees memory for new writes."""
    h = connect(args.uri, strict=0)
    cap, chunk = args.cap, args.chunk
    nchunks = cap // chunk
    size = h.get_size()
    check(size >= (nchunks + 2) * chunk, "device too small for this check")
    for i in range(nchunks):
        h.pwrite(pattern(i, chunk), i * chunk)
    # Rewriting allocated memory needs no more.
    h.pwrite(b"\x01" * 4096, 100)
    expect_error("write into one chunk too many", lambda: h.pwrite(b"z" * 4096, nchunks * chunk),
                 ["ENOSPC"])
    # Spanning the last allocated chunk and a new one; the first half rewrites what is there,
    # so whatever part of a refused write lands, the data stays as it was.
    last = pattern(nchunks - 1, chunk)
    expect_error("write spanning the cap",
                 lambda: h.pwrite(last[-4096:] + b"z" * 4096, nchunks * chunk - 4096), ["ENOSPC"])
    expect_error("zero with NO_HOLE beyond the cap",
                 lambda: h.zero(4096, (nchunks + 1) * chunk, nbd.CMD_FLAG_NO_HOLE), ["ENOSPC"])
    check(h.pread(4096, nchunks * chunk) == bytes(4096), "refused write left data behind")
    for i in range(1, nchunks):
        check(h.pread(chunk, i * chunk) == pattern(i, chunk), f"chunk {i} damaged by refusals")
    # Zeroing that may punch holes takes no memory, even past the cap.
    h.zero(2 * chunk, nchunks * chunk)
    # Trim the first chunk: its memory comes back, and the write that failed now succeeds.
    h.trim(chunk, 0)
    check(h.pread(chunk, 0) == bytes(chunk), "trimmed chunk does not read as zeros")
    h.pwrite(b"z" * 4096, nchunks * chunk)
    check(h.pread(4096, nchunks * chunk) == b"z" * 4096, "write after trim does not read back")
    expect_error("write into another chunk, cap reached again",
                 lambda: h.pwrite(b"y" * 4096, (nchunks + 1) * chunk), ["ENOSPC"])
    h.flush()
    h.shutdown()
    print("memory-cap: all checks passed")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("options")
    s.add_argument("uri", help="URI of the default export")
    s.add_argument("unknown_uri", help="URI of an export that does not exist")
    s.add_argument("--names", nargs="+", required=True)
    s.add_argument("--sizes", nargs="+", type=int, required=True)
    s.set_defaults(fn=cmd_options)

    for name, fn in [("block-status", cmd_block_status), ("structured-read", cmd_structured_read)]:
        s = sub.add_parser(name)
        s.add_argument("uri")
        s.add_argument("--align", type=int, default=2 * MIB,
                       help="allocation unit: data is written in whole units")
        s.add_argument("--expect-holes", action="store_true",
                       help="unwritten units must come back as hole chunks")
        s.set_defaults(fn=fn)

    for name, fn in [("errors", cmd_errors), ("read-only", cmd_read_only), ("flags", cmd_flags)]:
        s = sub.add_parser(name)
        s.add_argument("uri")
        s.set_defaults(fn=fn)

    s = sub.add_parser("concurrent")
    s.add_argument("uri")
    s.add_argument("--connections", type=int, default=64)
    s.add_argument("--span", type=int, default=MIB)
    s.set_defaults(fn=cmd_concurrent)

    s = sub.add_parser("verify-load")
    s.add_argument("uri")
    s.add_argument("--connections", type=int, default=4)
    s.add_argument("--span", type=int, default=8 * MIB)
    s.add_argument("--block", type=int, default=12288, help="not a divisor of the chunk size")
    s.add_argument("--seconds", type=float, default=120)
    s.add_argument("--stop", required=True, help="stop once this file exists")
    s.set_defaults(fn=cmd_verify_load)

    s = sub.add_parser("flood")
    s.add_argument("uri")
    s.add_argument("--depth", type=int, default=32)
    s.add_argument("--span", type=int, default=1 << 62, help="write only below this offset")
    s.set_defaults(fn=cmd_flood)

    s = sub.add_parser("hold")
    s.add_argument("uri")
    s.add_argument("--seconds", type=float, default=30)
    s.set_defaults(fn=cmd_hold)

    s = sub.add_parser("write-verify")
    s.add_argument("uri")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--length", type=int, default=8 * MIB)
    s.add_argument("--seed", type=int, default=5)
    s.set_defaults(fn=cmd_write_verify)

    s = sub.add_parser("large-requests")
    s.add_argument("uri")
    s.add_argument("--mode", choices=["export-name", "simple", "structured"], required=True)
    s.add_argument("--offset", type=int, default=12345)
    s.add_argument("--length", type=int, default=48_000_000)
    s.add_argument("--seed", type=int, default=9)
    s.set_defaults(fn=cmd_large_requests)

    s = sub.add_parser("memory-cap")
    s.add_argument("uri")
    s.add_argument("--cap", type=int, required=True)
    s.add_argument("--chunk", type=int, required=True)
    s.set_defaults(fn=cmd_memory_cap)

    args = p.parse_args()
    try:
        args.fn(args)
    except nbd.Error as e:
        fail(f"unexpected libnbd error: {e.errno}: {e.string}")


if __name__ == "__main__":
    main()
