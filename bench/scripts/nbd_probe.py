"""A 4 KiB QD1 probe over NBD (newstyle, NBD_OPT_EXPORT_NAME) that writes a stamped block,
reads it back, checks it, and records each request's latency: the largest stall a client
sees while chunks move. Runs until the file given as --stop exists; prints one summary line.
Only for measuring: the data checks that count are qemu-io's."""
import argparse, os, random, socket, struct, time

p = argparse.ArgumentParser()
p.add_argument("socket")
p.add_argument("--size", type=int, required=True)
p.add_argument("--stop", required=True)
a = p.parse_args()
s = socket.socket(socket.AF_UNIX)
s.connect(a.socket)


def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed the connection")
        b += c
    return b


recv(18)
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
size, _ = struct.unpack(">QH", recv(10))
lat, bad, cookie = [], 0, 0
rng = random.Random(7)
# The probe uses the last 64 MiB of the device, apart from the data the test checks.
base = size - (64 << 20)
while not os.path.exists(a.stop):
    off = base + rng.randrange(16384) * 4096
    data = struct.pack("<QQ", off, cookie) * 256
    for ty, payload in ((1, data), (0, b"")):
        cookie += 1
        t = time.monotonic()
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, ty, cookie, off, 4096) + payload)
        magic, err, ck = struct.unpack(">IIQ", recv(16))
        got = recv(4096) if ty == 0 else b""
        lat.append(time.monotonic() - t)
        if err or ck != cookie or (ty == 0 and got != data):
            bad += 1
lat.sort()
n = len(lat)
print(f"probe: {n} requests, median {lat[n // 2] * 1e6:.0f} us, p99 {lat[int(n * 0.99)] * 1e6:.0f} us, "
      f"max {lat[-1] * 1e3:.1f} ms, {bad} bad")
