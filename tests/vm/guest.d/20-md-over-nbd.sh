# Several machines joined with Linux md over NBD, as the README's "More than one machine"
# shows: three `vramdisk serve` hosts, each in a network namespace of its own joined to this
# one (the client) by a veth pair, TLS required with a test CA, each export attached with the
# kernel's nbd-client. RAID0 over the three; then RAID1 over two, with one host killed while
# a writer runs, the array degraded but serving, the host back, re-added and resynced.
set -euo pipefail
bin=$1
. "$(dirname "$0")/common.sh"

work=$(mktemp -d)
export VRAMDISK_RUNTIME_DIR=$work/run
mkdir -p "$VRAMDISK_RUNTIME_DIR" "$work/mnt"
declare -A pid dev
cleanup() {
  set +e
  umount "$work/mnt" 2>/dev/null
  mdadm --stop /dev/md0 /dev/md1 >/dev/null 2>&1
  for d in "${dev[@]}"; do nbd-client -d "$d" >/dev/null 2>&1; done
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null; done
  for i in 1 2 3; do ip netns del "vdh$i" 2>/dev/null; done
}
# What a failed step leaves behind to read: the array, the kernel's view, the writer.
diagnose() {
  echo "--- diagnostics: /proc/mdstat"
  cat /proc/mdstat
  echo "--- dmesg (last 40 lines)"
  dmesg | tail -n 40
  for f in "$work"/writer.log "$work"/host*.log; do
    [[ -e $f ]] && { echo "--- $f (last 20 lines)"; tail -n 20 "$f"; }
  done
  for p in $(pgrep -f "$work/mnt" 2>/dev/null); do
    echo "--- stack of $p: $(tr '\0' ' ' </proc/$p/cmdline)"
    cat "/proc/$p/stack" 2>/dev/null
  done
}
trap 'rc=$?; ((rc == 0)) || diagnose >&2; cleanup' EXIT

# A test CA, a server certificate per host (its address and name), a client certificate.
pki=$work/pki
mkdir -p "$pki"
cert() { # name subject-alt-names [ca]
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
    -keyout "$pki/$1-key.pem" -out "$pki/$1.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca-cert.pem" -CAkey "$pki/ca-key.pem" \
    -CAcreateserial -days 2 -out "$pki/$1-cert.pem" -extfile <(printf '%s\n' "$2") 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=vramdisk test CA" -keyout "$pki/ca-key.pem" -out "$pki/ca-cert.pem" 2>/dev/null
cert client "extendedKeyUsage=clientAuth"

# host i: namespace vdh$i at 10.77.$i.2, this namespace at 10.77.$i.1.
for i in 1 2 3; do
  ip netns add "vdh$i"
  ip link add "vdc$i" type veth peer name "vdh$i" netns "vdh$i"
  ip addr add "10.77.$i.1/24" dev "vdc$i"
  ip link set "vdc$i" up
  ip -n "vdh$i" addr add "10.77.$i.2/24" dev "vdh$i"
  ip -n "vdh$i" link set "vdh$i" up
  ip -n "vdh$i" link set lo up
  cert "host$i" "subjectAltName=DNS:host$i,IP:10.77.$i.2
extendedKeyUsage=serverAuth"
done

# Starts (or restarts) host $1's daemon: 128 MiB of RAM, TLS required, client certificates
# checked against the CA.
start_host() {
  local i=$1
  # nsenter, not `ip netns exec`: that one also makes a mount namespace, a copy of this one,
  # and a host restarted while md1 is mounted would keep md1 mounted in its copy.
  nsenter --net="/run/netns/vdh$i" env VRAMDISK_RUNTIME_DIR="$work/run$i" "$bin" serve --backend host \
    --size 128M --listen "10.77.$i.2:10809" --tls require --tls-cert "$pki/host$i-cert.pem" \
    --tls-key "$pki/host$i-key.pem" --tls-ca "$pki/ca-cert.pem" >>"$work/host$i.log" 2>&1 &
  pid[$i]=$!
  wait_for_count "$work/host$i.log" 120 'listening on nbds?://10.77' "$2"
}

# Attaches host $1's export with the kernel's nbd-client over TLS.
attach_host() {
  local i=$1 d
  d=$(free_nbd)
  # -timeout: without one, requests in flight when a host dies are never failed (the kernel
  # only logs "Possible stuck request" every 30 s), and md waits for them for ever.
  nbd_connect "10.77.$i.2" 10809 "$d" -N '' -enable-tls -cacertfile "$pki/ca-cert.pem" \
    -certfile "$pki/client-cert.pem" -keyfile "$pki/client-key.pem" -tlshostname "host$i" \
    -timeout 20 >/dev/null
  dev[$i]=$d
  echo "host$i: 10.77.$i.2 on $d"
}

for i in 1 2 3; do
  mkdir -p "$work/run$i"
  start_host "$i" 1
  attach_host "$i"
done

# RAID0 over the three hosts.
mdadm --create /dev/md0 --run --level=0 --raid-devices=3 --chunk=64 \
  "${dev[1]}" "${dev[2]}" "${dev[3]}"
mkfs.ext4 -q -F /dev/md0
mount /dev/md0 "$work/mnt"
make_tree "$work/mnt" "$work/sums0"
umount "$work/mnt"
echo 3 >/proc/sys/vm/drop_caches
mount /dev/md0 "$work/mnt"
check_tree "$work/mnt" "$work/sums0"
umount "$work/mnt"
mdadm --stop /dev/md0
mdadm --zero-superblock "${dev[1]}" "${dev[2]}" "${dev[3]}"
echo "RAID0 over three hosts: files verified"

# RAID1 over hosts 1 and 2 (fresh devices read as zeros, so no initial sync is needed).
mdadm --create /dev/md1 --run --level=1 --raid-devices=2 --assume-clean --metadata=1.2 \
  "${dev[1]}" "${dev[2]}"
mkfs.ext4 -q -F /dev/md1
mount /dev/md1 "$work/mnt"
# A writer that keeps writing files and checking each one it wrote, until told to stop.
(
  n=0
  while [[ ! -e $work/stop ]]; do
    head -c $((200 * 1024 + n * 4096)) /dev/urandom >"$work/mnt/w$n"
    sync "$work/mnt/w$n"
    sha256sum "$work/mnt/w$n" >>"$work/sums1"
    n=$((n + 1))
  done
  echo "writer: $n files"
) >"$work/writer.log" 2>&1 &
writer=$!
wait_for_count "$work/sums1" 300 . 5

# Host 2 dies mid-write: the array must drop it and go on.
kill -9 "${pid[2]}"
t0=$SECONDS
until grep -q '\[U_\]' /proc/mdstat; do
  ((SECONDS - t0 < 120)) || {
    cat /proc/mdstat
    die "md did not drop the dead host within 120 s"
  }
  sleep 0.5
done
echo "host2 killed: md1 degraded after $((SECONDS - t0))s"
have=$(wc -l <"$work/sums1")
wait_for_count "$work/sums1" 300 . $((have + 5))
kill -0 "$writer" || die "the writer stopped when host2 died: $(cat "$work/writer.log")"

# Host 2 comes back (empty: its memory went with it), is re-added and resynced.
mdadm /dev/md1 --fail "${dev[2]}" >/dev/null 2>&1 || true
mdadm /dev/md1 --remove "${dev[2]}"
nbd_disconnect "${dev[2]}"
start_host 2 2
attach_host 2
mdadm /dev/md1 --add "${dev[2]}"
t0=$SECONDS
mdadm --wait /dev/md1 || true
grep -q '\[UU\]' /proc/mdstat || {
  cat /proc/mdstat
  die "md1 did not resync onto host2"
}
echo "host2 re-added: resync took $((SECONDS - t0))s"
touch "$work/stop"
wait "$writer" || die "the writer failed: $(cat "$work/writer.log")"
cat "$work/writer.log"
(cd / && sha256sum -c --quiet "$work/sums1") || die "a file written during the failure is wrong"
umount "$work/mnt"
e2fsck -fn /dev/md1

# Both halves agree: a check pass (it has ended when the array is idle with "check" as its
# last action).
echo check >/sys/block/md1/md/sync_action
t0=$SECONDS
until [[ $(cat /sys/block/md1/md/sync_action) == idle &&
  $(cat /sys/block/md1/md/last_sync_action) == check ]]; do
  ((SECONDS - t0 < 600)) || die "md1's check did not finish within 600 s"
  sleep 0.5
done
mismatch=$(cat /sys/block/md1/md/mismatch_cnt)
((mismatch == 0)) || die "md1's halves differ in $mismatch sectors after the resync"
echo "RAID1 with a host killed and re-added: files verified, halves agree"
