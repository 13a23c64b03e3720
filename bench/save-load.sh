#!/bin/sh
# Save/load throughput of vramdisk's persistence against the raw disk.
#
#   bench/save-load.sh [DIR] [SIZE_MIB]
#
# DIR (default: a new directory under the current one) must be on the disk to measure and
# have room for 2 x SIZE_MIB (default 4096). For each fill (FILLS, default "10 100": percent
# of the device's chunks holding data) prints vramdisk's save and load rates (persist-bench:
# cache dropped before the load; the device side alone timed too), then dd reading the very
# file vramdisk saved (cache dropped; through the cache and with iflag=direct) and dd writing
# the same number of bytes to the same directory (conv=fsync; and oflag=direct), bs=8M.
#
# Environment:
#   BACKEND=host|cuda    device memory (default host); GPU=N picks the GPU (default 0)
#   IO=auto|direct|buffered   vramdisk's file I/O (default auto)
#   BIN=path             a prebuilt persist-bench (else built here with cargo), for machines
#                        without cargo, e.g. BIN=.gpu/bin/persist-bench
#   FILLS="10 100"       fills to run; the last one's image is what dd reads
#
# On the GPU machine (no cargo), CUDA device of 16 GiB, on its disk and on tmpfs:
#   here:  ../shared/tools/gpu-pack --bins && cargo build --release --example persist-bench &&
#          cp target/release/examples/persist-bench .gpu/bin/          (carry .gpu)
#   there: BIN=.gpu/bin/persist-bench BACKEND=cuda FILLS=100 sh bench/save-load.sh /var/tmp/vb 16384
#          BIN=.gpu/bin/persist-bench BACKEND=cuda FILLS=100 sh bench/save-load.sh /dev/shm/vb 16384
set -eu
dir=${1:-./bench-tmp}
size=${2:-4096}
fills=${FILLS:-10 100}
mkdir -p "$dir"
# The image and dd's copy of it lie side by side at the end.
avail=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1024)}')
if [ "$avail" -lt $((2 * size + 256)) ]; then
    echo "save-load.sh: $dir has ${avail} MiB free but needs $((2 * size + 256)) MiB: give a smaller SIZE_MIB or another DIR" >&2
    exit 1
fi
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --example persist-bench
    BIN=target/release/examples/persist-bench
fi

# secs START END -> seconds; rate MIB START END -> MiB/s (awk: no bc on every machine)
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", m / (b - a) }'; }
ddstep() { # name mib dd-args...
    name=$1 mib=$2
    shift 2
    t0=$(date +%s.%N)
    dd "$@" bs=8M status=none
    t1=$(date +%s.%N)
    echo "{\"step\":\"$name\",\"data_mib\":$mib,\"seconds\":$(secs "$t0" "$t1"),\"mib_per_s\":$(rate "$mib" "$t0" "$t1")}"
}
nocache() { dd if="$1" iflag=nocache count=0 status=none; }

commit=$(git rev-parse --short HEAD 2>/dev/null || cat .gpu/COMMIT 2>/dev/null || echo unknown)
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $commit $(uname -r) $(nproc) cores dir=$dir size=${size}MiB backend=${BACKEND:-host} io=${IO:-auto}"
echo "# filesystem: $(df -T "$dir" | awk 'NR==2 {print $1, $2}')"
if [ "${BACKEND:-host}" = cuda ] && command -v nvidia-smi >/dev/null; then
    echo "# gpu: $(nvidia-smi --query-gpu=name,memory.total,pci.bus_id --format=csv,noheader -i "${GPU:-0}")"
fi
echo "# load: $(uptime)"
for fill in $fills; do
    echo "# vramdisk, ${fill}% of chunks holding data"
    PERSIST_BENCH_KEEP=1 "$BIN" "$dir" "$size" "$fill" --backend "${BACKEND:-host}" \
        --gpu "${GPU:-0}" --io "${IO:-auto}"
done

img=$dir/bench.img
mib=$(($(stat -c %s "$img") >> 20))
echo "# dd on the image vramdisk saved (${mib} MiB), 8 MiB blocks"
nocache "$img"
ddstep "dd read" "$mib" if="$img" of=/dev/null
nocache "$img"
ddstep "dd read direct" "$mib" if="$img" of=/dev/null iflag=direct
cat "$img" >/dev/null # the source of the writes comes from memory
ddstep "dd write" "$mib" if="$img" of="$dir/dd.img" conv=fsync
rm -f "$dir/dd.img"
ddstep "dd write direct" "$mib" if="$img" of="$dir/dd.img" oflag=direct conv=fsync
rm -f "$dir/dd.img" "$img"
echo "# load: $(uptime)"
