# Helpers for the guest steps (sourced, not a step itself: tests/vm/guest runs only the
# numbered scripts of this directory).

# Fails the step with one sentence.
die() {
  echo "FAILED: $*" >&2
  exit 1
}

# Waits up to $2 seconds for a line matching the regex $3 in file $1 (a daemon's log).
wait_for_line() {
  local file=$1 secs=$2 re=$3 t0=$SECONDS
  until grep -qE "$re" "$file" 2>/dev/null; do
    ((SECONDS - t0 < secs)) || {
      cat "$file" >&2
      die "no line matching '$re' in $file within ${secs}s"
    }
    sleep 0.2
  done
}

# The first nbd device that is not connected (earlier steps may keep some busy).
free_nbd() {
  local d
  for d in /sys/block/nbd*; do
    [[ -e $d/pid || $(cat "$d/size") -ne 0 ]] || {
      echo "/dev/${d##*/}"
      return 0
    }
  done
  die "no free nbd device"
}

# Waits until udev has handled every event so far. A connect or disconnect makes the kernel
# send a change event, and udev's probe opens the device: an open of an nbd device that is
# not connected gives it a configuration of its own, and a connect to that index fails with
# EBUSY ("nbdN already in use" in the kernel's log, "Failed to setup device" from
# nbd-client) until the probe closes it again.
udev_settle() {
  ! command -v udevadm >/dev/null || udevadm settle --timeout=60 ||
    echo "udevadm settle: events still queued after 60 s" >&2
}

# nbd-client "$@" once udev is idle; on failure shows what the kernel said, then fails.
# Only the kernel's "nbdN already in use" for this device, logged since the call (an opener
# that udev_settle cannot see), is waited out: tried again until the device is free, for up
# to 30 s, and said loudly.
nbd_connect() {
  local dev mark said= t0=$SECONDS
  dev=$(printf '%s\n' "$@" | grep -m1 '^/dev/nbd') || die "nbd_connect: no /dev/nbdN in: $*"
  udev_settle
  mark=$(dmesg | wc -l)
  until nbd-client "$@"; do
    if ! dmesg | tail -n +"$((mark + 1))" | grep -q "${dev#/dev/} already in use" ||
      ((SECONDS - t0 >= 30)); then
      dmesg | tail -n 20 >&2
      die "nbd-client $* failed (the kernel's last messages above)"
    fi
    [[ -n $said ]] ||
      echo "*** nbd_connect: the kernel says $dev is in use; trying again until it is free ***" >&2
    said=1
    sleep 0.2
    udev_settle
    mark=$(dmesg | wc -l)
  done
}

# Disconnects nbd device $1 and waits (up to 60 s) until the kernel has let it go.
nbd_disconnect() {
  local t0=$SECONDS
  nbd-client -d "$1" || die "nbd-client -d $1 failed"
  while [[ -e /sys/block/${1#/dev/}/pid ]]; do
    ((SECONDS - t0 < 60)) || die "$1 is still connected 60 s after nbd-client -d"
    sleep 0.2
  done
}

# Waits up to $2 seconds for $4 lines matching the regex $3 in file $1.
wait_for_count() {
  local file=$1 secs=$2 re=$3 n=$4 t0=$SECONDS
  local c
  while c=$(grep -cE "$re" "$file" 2>/dev/null || true); ((${c:-0} < n)); do
    ((SECONDS - t0 < secs)) || {
      cat "$file" >&2
      die "fewer than $n lines matching '$re' in $file within ${secs}s"
    }
    sleep 0.2
  done
}

# Writes a tree of files of varied sizes under $1 and their checksums to $2.
make_tree() {
  local dir=$1 sums=$2
  for d in 0 1 2; do
    mkdir -p "$dir/d$d/e$d"
    for f in 0 1 2 3 4; do
      head -c $(((d * 5 + f) * 97531 + 1)) /dev/urandom >"$dir/d$d/e$d/f$f"
    done
  done
  (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$sums"
}

# Checks the tree under $1 against the checksums in $2.
check_tree() {
  (cd "$1" && sha256sum -c --quiet "$2") || die "checksums differ under $1"
}

# Bytes that the export named $2 holds, as `vramdisk status --json` shows it, among the
# daemons of the runtime directory $1.
allocated() {
  VRAMDISK_RUNTIME_DIR=$1 "$bin" status --json |
    NAME=$2 python3 -c 'import json, os, sys
for d in json.load(sys.stdin):
    for e in d["exports"]:
        if e["name"] == os.environ["NAME"]:
            print(e["allocated"])
            sys.exit(0)
sys.exit("no export named %r in vramdisk status --json" % os.environ["NAME"])'
}

# A process in a memory cgroup limited to 48 MiB writes $2 MiB of anonymous memory, pages it
# out, and reads it back: most of it goes through the swap device $1 and must come back
# intact. Retries (up to 3 times) only when the cgroup's own OOM killer took the process.
swap_hog() {
  local dev=$1 mib=$2 attempt cg
  for attempt in 1 2 3; do
    cg=/sys/fs/cgroup/vm-swap-$$-$attempt
    echo +memory >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
    mkdir "$cg" || die "cannot make a memory cgroup"
    echo $((48 << 20)) >"$cg/memory.max"
    echo max >"$cg/memory.swap.max"
    if out=$(CG=$cg DEV=$dev MIB=$mib timeout 600 sh -c 'echo $$ > "$CG/cgroup.procs" && exec python3 -c "
import mmap, os
MiB = 1 << 20
size, step = int(os.environ[\"MIB\"]) * MiB, 8 * MiB
seed = os.urandom(MiB)
def piece(off):
    return bytes(x ^ (off >> 20) & 0xff for x in seed[:64]) + seed[64:]
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, step):
    for o in range(off, off + step, MiB):
        m[o:o + MiB] = piece(o)
    m.madvise(21, off, step)
used = 0
for line in open(\"/proc/swaps\").read().splitlines()[1:]:
    f = line.split()
    if os.path.realpath(f[0]) == os.path.realpath(os.environ[\"DEV\"]):
        used = int(f[3]) * 1024
bad = sum(m[o:o + MiB] != piece(o) for o in range(0, size, MiB))
print(used >> 20, \"match\" if bad == 0 else \"MISMATCH\")
"'); then
      rmdir "$cg"
      echo "swap hog: $out (MiB through $dev, data)"
      set -- $out
      [[ $2 == match ]] || die "swapped pages came back corrupted"
      (($1 >= mib / 3)) || die "only $1 MiB went to swap on $dev"
      return 0
    fi
    kills=$(awk '$1 == "oom_kill" {print $2}' "$cg/memory.events")
    rmdir "$cg"
    [[ ${kills:-0} -gt 0 && $attempt -lt 3 ]] || die "the swap hog failed: $out"
    echo "swap hog: attempt $attempt taken by the cgroup's OOM killer; again"
  done
}
