#!/bin/sh
# Save/load throughput of vramdisk's persistence against the raw disk.
#
#   bench/save-load.sh [DIR] [SIZE_MIB]
#
# DIR (default: a new directory under the current one) must be on the disk to measure and
# have room for 2 x SIZE_MIB (default 4096). Prints vramdisk's save and load rates (through
# engine::persist, host backend, cache dropped before the load) next to dd writing and reading
# the same number of bytes to the same directory (conv=fsync, cache dropped before the read).
set -eu
dir=${1:-./bench-tmp}
size=${2:-4096}
mkdir -p "$dir"
cargo build --release --quiet --example persist-bench
bin=target/release/examples/persist-bench

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -r) dir=$dir size=${size}MiB"
echo "# filesystem: $(df -T "$dir" | awk 'NR==2 {print $1, $2}')"
for fill in 100 10; do
    echo "# vramdisk, ${fill}% of chunks holding data"
    "$bin" "$dir" "$size" "$fill"
done

echo "# dd, same bytes (${size} MiB), 8 MiB blocks"
dd if=/dev/urandom of="$dir/src.bin" bs=8M count=$((size / 8)) status=none
dd if="$dir/src.bin" iflag=nocache count=0 status=none
dd if="$dir/src.bin" of=/dev/null bs=8M status=none # warm the source into the cache
t0=$(date +%s.%N)
dd if="$dir/src.bin" of="$dir/dd.img" bs=8M conv=fsync status=none
t1=$(date +%s.%N)
echo "{\"step\":\"dd write\",\"data_mib\":$size,\"seconds\":$(echo "$t1 - $t0" | bc),\"mib_per_s\":$(echo "$size / ($t1 - $t0)" | bc)}"
dd if="$dir/dd.img" iflag=nocache count=0 status=none
t0=$(date +%s.%N)
dd if="$dir/dd.img" of=/dev/null bs=8M status=none
t1=$(date +%s.%N)
echo "{\"step\":\"dd read\",\"data_mib\":$size,\"seconds\":$(echo "$t1 - $t0" | bc),\"mib_per_s\":$(echo "$size / ($t1 - $t0)" | bc)}"
rm -f "$dir/src.bin" "$dir/dd.img"
