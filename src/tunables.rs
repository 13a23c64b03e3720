//! Every constant a heuristic of the attach frontends, the engine or the daemon runs on, in
//! one place, each with how it was chosen: measured (on which machine, with which bench),
//! derived from a limit elsewhere, or not measured at all. Change one here, and re-run the
//! bench its comment names before believing the new value.
//!
//! Not here: facts of the kernel or a protocol (request size limits of the nbd, loop and
//! ublk drivers, netlink numbers), which are not ours to tune, and the NBD server's and the
//! persistence file's own (in `nbd/` and `engine/persist*`), but for busy polling, which NBD
//! connections and FUSE threads share.

use std::time::Duration;

// --- attach: FUSE + loop -------------------------------------------------------------------

/// CPUs per FUSE thread that reads while requests are fast. A request through the loop
/// device costs the submitting program, the loop worker and the completion softirq about
/// as much CPU as it costs us, so beyond a reader per four CPUs fast requests only fight
/// over the CPUs. Measured on 2 CPUs only (`bench/attach`: 4 KiB at queue depth 32, 173k
/// IOPS with one thread against 136k with two); the 4 itself is that argument, not a
/// measurement on a larger machine.
pub const CPUS_PER_FAST_READER: usize = 4;

/// Device time per request above which more FUSE threads help: a request this long leaves
/// time for another thread to be woken and serve the next one meanwhile. Not measured:
/// chosen as 5 µs, above a 4 KiB host copy ("a few µs", `attach/pacing.rs`) and below any
/// GPU copy or large transfer.
pub const SLOW_WORK: Duration = Duration::from_micros(5);

/// How often a parked FUSE thread looks whether the connection is gone (unmount), so that
/// it never keeps the session from ending. Not measured: chosen as short next to a human
/// waiting for `detach`, long next to the cost of a wakeup.
pub const PARK_CHECK: Duration = Duration::from_millis(20);

/// How long the kernel caches the FUSE file's attributes. Not measured: the size is fixed
/// and nothing changes behind the kernel's back, so an hour only saves GETATTR calls.
pub const ATTR_TTL: Duration = Duration::from_secs(3600);

/// FUSE-over-io_uring ring entries shared out among the queues' threads: enough that a
/// queue depth of 32 on few CPUs finds entries free (the loop's requests of one submitter
/// mostly land on one queue), few enough that a machine with many CPUs does not hold
/// hundreds of payload buffers, each the size of the largest request and taken from the
/// device's buffer pool for good. Not measured as such: on 2 CPUs [`URING_MAX_DEPTH`] and
/// [`URING_THREADS_PER_QUEUE`] leave 32 of them in use; the cap limits only machines of
/// more than 4 CPUs.
pub const URING_ENTRIES: usize = 64;

/// Ring entries per FUSE-over-io_uring thread at the start at most. Few, because on host
/// memory a thread copies each request as it begins it, one after another, while the
/// kernel hands a queue's next request to the entry committed last, whichever thread lent
/// it: a thread busy copying 1 MiB with many free entries collects the requests that come
/// meanwhile, and its siblings wait with nothing to do (GPU copies are begun together and
/// complete later, so there threads grow more: [`URING_GROW_DEPTH`]). Measured on 2 CPUs
/// (three daemons attached at once, fio QD32, 4 runs of 3 s alternated, median, 1 MiB read
/// / write and 4 KiB read / write MiB/s): 2 threads of 16 entries 5676 / 5697 and 656 /
/// 626; 4 of 4 7370 / 7005 and 625 / 614; 8 of 2 7246 / 7141 and 559 / 558 (more threads
/// wake more often at 4 KiB); 4 KiB with 128 submitters within the noise of each other.
/// Log: bench/results/logs/uring-layout-2026-12-04.txt.
pub const URING_MAX_DEPTH: usize = 4;

/// Threads (each with its own io_uring and share of the entries) serving one FUSE queue,
/// where [`URING_ENTRIES`] allows. The kernel queues a request on the queue of the CPU
/// that issued it, and the loop's requests of one submitter mostly come from one CPU: with
/// one thread per queue, 1 MiB requests were copied one after another while the other CPU
/// served nothing. Measured on 2 CPUs under other load (fio 1 MiB QD32 read, 3 runs each:
/// 1467-1680 MiB/s with one thread per queue, 1601-2725 with two, fuser 1958-2430;
/// `bench/attach` with two: 1 MiB read 0.75x and write 0.83x tmpfs+loop, from 0.37-0.57
/// and 0.53-0.66 with one; 4 KiB 0.66-0.84x, as before within the noise). Four, with
/// [`URING_MAX_DEPTH`] 4: see there.
pub const URING_THREADS_PER_QUEUE: usize = 4;

/// Ring entries one FUSE-over-io_uring thread may grow to. A thread keeps every request
/// of its entries in flight on the device at once (GPU copies complete later, on the
/// copy queue's poller), so a queue serves as many requests at a time as it has entries;
/// the kernel queues the rest. It starts with its share of [`URING_ENTRIES`] and lends
/// the kernel one more each time it would sleep with all of its entries waiting on the
/// device, up to this and [`URING_ENTRIES_MAX`]. Memory on the host never waits, so
/// never grows. Measured on the H200 (bench/attach, 4 KiB QD32 and 128 threads; see
/// bench/results/gpu-e2e.md): with one entry per thread and no growth, a queue served
/// four requests at a time, 0.39-0.50x tmpfs+loop.
pub const URING_GROW_DEPTH: usize = 16;

/// Ring entries all queues of one attached device may grow to ([`URING_GROW_DEPTH`]),
/// each holding a payload buffer the size of the largest request from the device's buffer
/// pool for good: 256 MiB at most with 1 MiB requests, where the pool allows.
pub const URING_ENTRIES_MAX: usize = 256;

// --- attach: kernel nbd --------------------------------------------------------------------

/// Most payload bytes in flight on one kernel nbd connection before the server stops
/// reading its requests. Not measured: derived as the kernel's largest request (32 MiB)
/// twice over, so one large request never waits behind another.
pub const INFLIGHT_PER_CONNECTION: usize = 64 << 20;

/// Buffers of each size made ready per kernel nbd connection (requests in flight at once
/// on it, before more are allocated). Not measured: chosen as 2 (the commit that brought
/// it, 8f9554f, gives no reason); requests beyond it allocate.
pub const PREWARM_PER_CONNECTION: usize = 2;

/// Largest buffer size made ready before the kernel sees an nbd device. Derived: the block
/// layer sends at most 1280 KiB by default (`max_sectors_kb`), and 2 MiB is the buffer
/// class that holds it; larger requests, after a raised `max_sectors_kb`, get their
/// buffers on first use.
pub const PREWARM_MAX: usize = 2 << 20;

// --- attach: ublk --------------------------------------------------------------------------

/// Requests in flight per ublk queue. Each holds an I/O buffer of [`UBLK_IO_BUF_BYTES`],
/// locked in RAM. Not measured: chosen so that 32 × 512 KiB = 16 MiB per queue, what one
/// FUSE thread holds on the FUSE path.
pub const UBLK_QUEUE_DEPTH: u16 = 32;

/// Largest ublk request, and the size of each request's buffer. Not measured: 512 KiB is
/// what every ublk driver version accepts and libublk's default.
pub const UBLK_IO_BUF_BYTES: u32 = 512 << 10;

/// Most bytes one ublk discard or write-zeroes request covers (they carry no data). Not
/// measured: chosen as 1 GiB.
pub const UBLK_MAX_DISCARD_BYTES: u32 = 1 << 30;

// --- engine --------------------------------------------------------------------------------

/// Idle I/O buffers kept per size class beyond which freed buffers go back to the
/// allocator; keeps a burst of large requests from pinning memory forever. Not measured:
/// chosen as 64 MiB.
pub const MAX_IDLE_BYTES_PER_CLASS: usize = 64 << 20;

/// Host-backend writes at least this long bypass the CPU caches (streaming stores).
/// Measured on the dev VM: 2x the copy rate into a 1 GiB region, nbdcopy to the device
/// +8-17%; lowered to 4 KiB, 4 KiB random writes over NBD moved by 2-3% at QD64 (within
/// noise) and not at all at QD1, while small blocks are the ones most likely to be read
/// back soon, so it stays at 64 KiB.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub const STREAM_MIN: usize = 64 << 10;

/// Staging slots of the CUDA backend for buffers that are not pinned. Not measured: chosen
/// so that with [`CUDA_STAGING_SLOT_SIZE`] 32 MiB are pinned in all.
pub const CUDA_STAGING_SLOTS: usize = 64;

/// Size of one CUDA staging slot. Not measured: chosen as 512 KiB.
pub const CUDA_STAGING_SLOT_SIZE: usize = 512 << 10;

/// Threads per block of the CUDA copy kernel: one block copies one descriptor, 16 bytes
/// per thread per step, so a 4 KiB copy is one step. Not measured: chosen as 256 for that
/// one-step 4 KiB copy; no other block size was tried.
pub const CUDA_COPY_THREADS: u32 = 256;

/// How long a CUDA completion thread spins with nothing in flight before it parks. Not
/// measured: chosen as 100 µs, several times a QD1 request's round trip on the H200
/// machine (~20 µs, `bench/notes-gpu.md`), so a client that keeps one request going
/// should not find it parked.
pub const CUDA_REAPER_IDLE_SPIN: Duration = Duration::from_micros(100);

/// How long a task whose small GPU copy went out with others re-polls itself before it
/// asks the completion thread to wake it (`cuda::queue`, `QueueOptions::yield_spin`).
/// Measured on the H200 machine (`vramdisk bench --seconds 2 --only 4K --yield-us N`, two
/// alternating rounds, dc65e03): 4 KiB QD128 read/write 1.40-1.43 M / 1.48-1.57 M IOPS
/// with 0 (every completion a wake), 3.44-3.55 M / 3.24-3.44 M with 50, 3.19-3.37 M /
/// 3.05-3.29 M with 200; QD32 1.02-1.03 M against 1.28-1.35 M; QD1 unchanged. 50 µs is
/// above a loaded batch's round trip (31 µs median at QD128) so most ops never need the wake.
pub const CUDA_YIELD_SPIN: Duration = Duration::from_micros(50);

/// How often the tiers read the GPU's free memory. Not measured: chosen as 20 ms because a
/// program growing in 2 GiB steps at PCIe speed takes about 40 ms a step, so the reserve is
/// restored before the next one lands.
pub const TIER_POLL: Duration = Duration::from_millis(20);

/// Free memory must stay above the promotion threshold this long before chunks come back,
/// so a program that frees memory between steps (a training loop) does not make the tiers
/// thrash. Not measured: chosen as 1 s, longer than such a step.
pub const TIER_SETTLE: Duration = Duration::from_secs(1);

/// Most bytes per second brought back to the GPU. Derived from a measurement: 4 GB/s is
/// under a tenth of a Gen5 x16 link (55 GB/s measured on the H200 machine), so the GPU's
/// own work keeps the rest.
pub const TIER_PROMOTE_RATE: u64 = 4_000_000_000;

/// Chunk moves between tiers in flight at once. Measured: 16 moves of 2 MiB keep all of the
/// copy queue's streams busy (the H200 machine reached 47.5 GB/s with 4 streams of 2 MiB
/// copies; `bench/yield-gpu`: 37.9 GB/s yield).
pub const TIER_MOVES_IN_FLIGHT: usize = 16;

/// Slab size of spill RAM. Measured: pinning costs the same per byte for 64 and 256 MiB
/// slabs, and a smaller slab keeps the last one from overshooting the capacity by much.
pub const SPILL_RAM_SLAB: usize = 64 << 20;

/// Shards of a device's I/O counters (`engine::metered`): each thread counts in its own,
/// so that connections on different threads never write one cache line. Derived, not
/// measured: the NBD server's most connection threads (16), so that each has its own;
/// threads beyond it share, which costs contention and nothing else.
pub const METRICS_SHARDS: usize = 16;

// --- ops -----------------------------------------------------------------------------------

/// How often a save in progress reports to a client that asked for progress. Not
/// measured: chosen as 250 ms (four updates a second for the terminal bar).
pub const SAVE_PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Longest a metrics scrape may take before its connection is dropped. Not measured:
/// chosen as 10 s, which is also Prometheus's default scrape timeout.
pub const METRICS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

// --- busy polling: NBD connections and FUSE threads (see `busy_poll`, `nbd::transmission::poll`) ---

/// Polls in a row that found nothing before polling rests. Three: one empty poll happens to
/// any client between bursts, three in a row mean the client is slower than the budget.
pub const POLL_MISS_LIMIT: u32 = 3;

/// Waits polling first rests for; doubles with each failed try. Not measured: short enough
/// that a client whose pace changes is caught again within a few hundred µs of requests.
pub const POLL_REST_MIN: u32 = 16;

/// Longest rest, in waits: a client that never comes back within a poll costs one budget
/// per this many requests, under 0.1 % of its waits.
pub const POLL_REST_MAX: u32 = 1024;

/// Fewer idle CPUs than this (averaged over a sample) and polls do not spin: half a CPU is
/// the least that one spinning poller can take without pushing someone else off a CPU.
pub const POLL_SPARE_CPUS: f64 = 0.5;

/// How often `/proc/stat` is read: a read costs about 10 µs, so at this period it is far
/// below the noise of any request; long enough to average over many requests.
pub const POLL_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Waits through the reactor after a poll found the client's next request already there.
/// Not measured on its own: long enough that the reactor's batching shows (32 requests is
/// a queue depth's worth for most clients), short enough to notice a client that slows down.
pub const AHEAD_WAITS: u32 = 32;

/// A wait up to this many budgets long keeps the poller warm: a client slower than that is
/// not in a tight loop (an idle client costs one budget at the end of its burst, then none).
pub const WARM_BUDGETS: u32 = 2;
