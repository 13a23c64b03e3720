//! When busy polling pays, shared by the two places that poll: an NBD connection waiting for
//! its client's next request (`nbd::transmission`) and a FUSE thread waiting for the kernel's
//! next request (`attach::pacing`).
//!
//! A poll that finds its bytes saves a wakeup (tens of µs on a VM whose idle CPUs halt); a
//! poll that finds nothing burns its whole budget, and, on a machine with no CPU to spare,
//! takes that CPU from the very client it waits for. So two signals turn polling off by
//! themselves, whatever `--busy-poll` says:
//!
//! - **Empty polls** ([`Misses`]): after [`MISS_LIMIT`] polls in a row that ran out their
//!   budget, polling rests for a number of waits that doubles with every failed try (from
//!   [`REST_MIN`] to [`REST_MAX`]); one poll that finds bytes brings it back at once.
//! - **No idle CPU** ([`cpu_to_spare`]): the machine's idle time, read from `/proc/stat` at
//!   most every [`SAMPLE_EVERY`], plus what the pollers themselves spent spinning (CPU they
//!   would give back). Under [`SPARE_CPUS`] idle CPUs a poll makes one try and never spins.
//!
//! What these replace: a rule fitted to two machines (step aside on at most four CPUs) and
//! no defence at all against a starved machine. In the test VM (2 vCPUs under TCG, host
//! oversubscribed), a 4 KiB queue-depth-1 client fell from 1.5k to 0.1k IOPS with polling on.

pub(crate) use crate::tunables::{
    POLL_MISS_LIMIT as MISS_LIMIT, POLL_REST_MAX as REST_MAX, POLL_REST_MIN as REST_MIN,
    POLL_SAMPLE_EVERY as SAMPLE_EVERY, POLL_SPARE_CPUS as SPARE_CPUS,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The record of one poller's empty polls (see the module docs). Each poller owns one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Misses {
    /// Polls in a row that ran out their budget.
    in_a_row: u32,
    /// Waits left before polling tries again.
    resting: u32,
    /// The rest the next failed try earns.
    next_rest: u32,
}

impl Misses {
    /// Whether this wait may poll; a rest counts down by one wait.
    pub(crate) fn may_poll(&mut self) -> bool {
        if self.resting > 0 {
            self.resting -= 1;
            return false;
        }
        true
    }

    /// Notes a poll's outcome: `found` bytes, or ran out its budget.
    pub(crate) fn record(&mut self, found: bool) {
        if found {
            self.in_a_row = 0;
            self.next_rest = 0;
            return;
        }
        self.in_a_row += 1;
        if self.in_a_row >= MISS_LIMIT {
            // After a rest, a single empty poll (the try) sends it back to rest, for longer.
            self.in_a_row = MISS_LIMIT - 1;
            self.resting = self.next_rest.max(REST_MIN);
            self.next_rest = (self.resting * 2).min(REST_MAX);
        }
    }

    /// Whether polling is resting now.
    #[cfg(test)]
    pub(crate) fn is_resting(&self) -> bool {
        self.resting > 0
    }
}

/// Nanoseconds every poller together has spent spinning (polls that did not find bytes at
/// their first try); counted back as idle, since it is CPU the pollers would give up.
static SPUN_NS: AtomicU64 = AtomicU64::new(0);
/// The verdict of the last sample; until the first one, CPU is assumed to be there.
static SPARE: AtomicBool = AtomicBool::new(true);
/// When the next sample is due, in ns since the first call.
static NEXT_SAMPLE_NS: AtomicU64 = AtomicU64::new(0);
/// The last sample, taken by whichever poller finds it stale first.
static LAST: Mutex<Option<Sample>> = Mutex::new(None);

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// Idle and iowait time of all CPUs, in clock ticks.
    idle_ticks: u64,
    spun_ns: u64,
}

/// Notes that a poller spun for `d` (see [`SPUN_NS`]).
pub(crate) fn spun(d: Duration) {
    SPUN_NS.fetch_add(
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// Whether the machine has a CPU to spare for a poll that spins (see the module docs).
/// Cheap: an atomic load, and now and then (every [`SAMPLE_EVERY`]) a read of `/proc/stat`
/// by one caller.
pub(crate) fn cpu_to_spare() -> bool {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let now = Instant::now();
    let now_ns = u64::try_from(now.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
    // A plain load on the way of every poll; the lock only when a sample is due.
    if now_ns < NEXT_SAMPLE_NS.load(Ordering::Relaxed) {
        return SPARE.load(Ordering::Relaxed);
    }
    if let Ok(mut last) = LAST.try_lock() {
        NEXT_SAMPLE_NS.store(
            now_ns.saturating_add(SAMPLE_EVERY.as_nanos() as u64),
            Ordering::Relaxed,
        );
        if let Some(idle_ticks) = read_idle_ticks() {
            let sample = Sample {
                at: now,
                idle_ticks,
                spun_ns: SPUN_NS.load(Ordering::Relaxed),
            };
            if let Some(prev) = *last {
                let idle = idle_cpus(&prev, &sample, ticks_per_second());
                SPARE.store(idle >= SPARE_CPUS, Ordering::Relaxed);
            }
            *last = Some(sample);
        }
    }
    SPARE.load(Ordering::Relaxed)
}

/// Idle CPUs between two samples, the pollers' spinning counted as idle.
fn idle_cpus(prev: &Sample, now: &Sample, ticks_per_s: f64) -> f64 {
    let secs = now.at.duration_since(prev.at).as_secs_f64();
    if secs <= 0.0 {
        return f64::INFINITY;
    }
    let idle = now.idle_ticks.saturating_sub(prev.idle_ticks) as f64 / ticks_per_s;
    let spun = now.spun_ns.saturating_sub(prev.spun_ns) as f64 / 1e9;
    (idle + spun) / secs
}

fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Idle plus iowait ticks of all CPUs, from the first line of `/proc/stat`; `None` where it
/// cannot be read (then the verdict stays as it was).
fn read_idle_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_idle_ticks(stat.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle + iowait. Steal is time
/// the hypervisor gave to others: not idle, so it counts against polling.
fn parse_idle_ticks(line: &str) -> Option<u64> {
    let mut f = line.split_ascii_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(5).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    Some(v.get(3)? + v.get(4).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty polls rest polling, for longer each time; one hit brings it back.
    #[test]
    fn empty_polls_rest_and_a_hit_wakes() {
        let mut m = Misses::default();
        for _ in 0..MISS_LIMIT - 1 {
            assert!(m.may_poll());
            m.record(false);
        }
        assert!(!m.is_resting(), "fewer than MISS_LIMIT misses do not rest");
        assert!(m.may_poll());
        m.record(false);
        assert!(m.is_resting());
        let rest = (0..).take_while(|_| !m.may_poll()).count();
        assert_eq!(rest, REST_MIN as usize);
        // The try after a rest misses: a longer rest at once.
        m.record(false);
        let rest = (0..).take_while(|_| !m.may_poll()).count();
        assert_eq!(rest, 2 * REST_MIN as usize);
        // Rests stop growing at REST_MAX.
        for _ in 0..20 {
            m.record(false);
            while !m.may_poll() {}
        }
        m.record(false);
        assert_eq!(
            (0..).take_while(|_| !m.may_poll()).count(),
            REST_MAX as usize
        );
        // A hit: polling is back, and the next misses start from the shortest rest again.
        m.record(true);
        for _ in 0..MISS_LIMIT - 1 {
            assert!(m.may_poll());
            m.record(false);
        }
        assert!(!m.is_resting());
        m.record(false);
        assert_eq!(
            (0..).take_while(|_| !m.may_poll()).count(),
            REST_MIN as usize
        );
    }

    #[test]
    fn idle_ticks_are_idle_plus_iowait() {
        assert_eq!(
            parse_idle_ticks("cpu  4705 356 584 3699176 23060 0 277 0 0 0"),
            Some(3699176 + 23060)
        );
        assert_eq!(
            parse_idle_ticks("cpu0 1 2 3 4 5"),
            None,
            "a single CPU's line"
        );
        assert_eq!(parse_idle_ticks("cpu 1 2 x 4 5"), None);
        assert!(read_idle_ticks().is_some(), "this machine's /proc/stat");
    }

    /// Idle CPUs from two samples: idle ticks over time, spinning counted as idle.
    #[test]
    fn idle_cpus_count_spinning_as_idle() {
        let t0 = Instant::now();
        let a = Sample {
            at: t0,
            idle_ticks: 1000,
            spun_ns: 0,
        };
        let b = Sample {
            at: t0 + Duration::from_secs(1),
            idle_ticks: 1050,
            spun_ns: 0,
        };
        assert!((idle_cpus(&a, &b, 100.0) - 0.5).abs() < 1e-9);
        let c = Sample {
            spun_ns: 250_000_000,
            ..b
        };
        assert!((idle_cpus(&a, &c, 100.0) - 0.75).abs() < 1e-9);
        let none = Sample {
            idle_ticks: 1000,
            ..b
        };
        assert!(idle_cpus(&a, &none, 100.0) < SPARE_CPUS);
    }
}
