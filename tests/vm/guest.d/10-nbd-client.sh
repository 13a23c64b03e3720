# The real nbd-client (Debian's package) against `vramdisk serve`, as the README shows it:
# four connections, ext4 with a remount and fsck across a reconnect, fstrim giving memory
# back, then swap with -swap and a memory-limited process that checks its data.
set -euo pipefail
bin=$1
. "$(dirname "$0")/common.sh"
command -v nbd-client >/dev/null || die "nbd-client is not installed (apt-get install nbd-client)"

work=$(mktemp -d)
export VRAMDISK_RUNTIME_DIR=$work/run
mkdir -p "$VRAMDISK_RUNTIME_DIR" "$work/mnt"
disk=$(free_nbd)
srv=
cleanup() {
  umount "$work/mnt" 2>/dev/null || true
  [[ -z ${swap:-} ]] || swapoff "$swap" 2>/dev/null || true
  nbd-client -d "$disk" >/dev/null 2>&1 || true
  [[ -z ${swap:-} ]] || nbd-client -d "$swap" >/dev/null 2>&1 || true
  [[ -z $srv ]] || kill $srv 2>/dev/null || true
}
trap cleanup EXIT

"$bin" serve --backend host --size 256M --listen 127.0.0.1:10809 >"$work/serve.log" 2>&1 &
srv=$!
# Swap is preallocated: a page-out never waits for an allocation.
"$bin" serve --backend host --export swap=160M --preallocate --listen 127.0.0.1:10810 \
  >"$work/swap.log" 2>&1 &
srv="$srv $!"
wait_for_line "$work/serve.log" 120 'listening on nbd://127.0.0.1:10809'
wait_for_line "$work/swap.log" 120 'listening on nbd://127.0.0.1:10810'

# As the README: the default export (-N ''), four connections.
nbd_connect 127.0.0.1 10809 "$disk" -N '' -C 4
wait_for_count "$work/serve.log" 60 'client .* connected' 4
# The swap device, picked now so that it is not the one about to be disconnected and
# reconnected.
swap=$(free_nbd)
[[ $(cat "/sys/block/${disk#/dev/}/size") -eq $((256 << 11)) ]] || die "$disk is not 256 MiB"

mkfs.ext4 -q -F "$disk"
mount "$disk" "$work/mnt"
make_tree "$work/mnt" "$work/sums"
umount "$work/mnt"
nbd_disconnect "$disk"
nbd_connect 127.0.0.1 10809 "$disk" -N '' -C 4
mount "$disk" "$work/mnt"
check_tree "$work/mnt" "$work/sums"
before=$(allocated "$VRAMDISK_RUNTIME_DIR" "")
rm -rf "$work/mnt"/d*
fstrim -v "$work/mnt"
after=$(allocated "$VRAMDISK_RUNTIME_DIR" "")
echo "allocated before fstrim $before, after $after"
((after < before)) || die "fstrim gave no memory back ($before -> $after bytes)"
umount "$work/mnt"
e2fsck -fn "$disk"
nbd_disconnect "$disk"

# Swap, as the README shows it.
nbd_connect 127.0.0.1 10810 "$swap" -N swap -swap
mkswap "$swap" >/dev/null
swapon "$swap"
swap_hog "$swap" 128
swapoff "$swap"
nbd_disconnect "$swap"
echo "nbd-client: ext4, fstrim and swap passed"
