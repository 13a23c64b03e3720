//! How the daemon shows the progress of a save or load, and how it tunes them: the engine
//! only counts bytes (through [`persist::Progress`]) and takes [`persist::Options`].

use crate::engine::BlockDevice;
use crate::engine::persist::{self, IoMode, Progress};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Environment variable that picks the [`IoMode`] of the daemon's saves and loads.
pub const IO_MODE_ENV: &str = "VRAMDISK_PERSIST_IO";

/// The defaults, with the I/O mode taken from `VRAMDISK_PERSIST_IO` (`auto`, `direct`,
/// `buffered`) when set; an unknown value is logged and ignored.
pub fn persist_options() -> persist::Options {
    let io = match std::env::var(IO_MODE_ENV) {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            tracing::warn!("{IO_MODE_ENV}: {e:#}; using auto");
            IoMode::Auto
        }),
        Err(_) => IoMode::Auto,
    };
    persist::Options {
        io,
        block_size: None,
    }
}

/// Total bytes a save of `dev` moves (0 where the extent map cannot be read: the save
/// itself then fails and says why).
pub fn save_total(dev: &dyn BlockDevice) -> u64 {
    persist::bytes_to_save(dev).unwrap_or(0)
}

/// Total bytes a load of `path` moves (0 where the file is unreadable: the load itself then
/// fails and says why).
pub fn load_total(path: &Path) -> u64 {
    persist::inspect(path).map(|l| l.data_bytes).unwrap_or(0)
}

/// Reports progress as a bar when stderr is a terminal, as a log line every few seconds
/// otherwise.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    started: Instant,
    last_log: Mutex<Instant>,
}

impl ConsoleProgress {
    /// Progress of `label` ("saving to x.img") over `total` bytes.
    pub fn new(label: &str, total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.to_string());
            bar
        });
        ConsoleProgress {
            bar,
            label: label.to_string(),
            total,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
        }
    }
}

impl Progress for ConsoleProgress {
    fn update(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        // Called once per 8 MiB record, so the lock is not on any client's I/O path.
        let mut last = self.last_log.lock().unwrap();
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            tracing::info!(
                "{}: {} of {} MiB ({:.0}%)",
                self.label,
                done >> 20,
                self.total >> 20,
                done as f64 * 100.0 / self.total.max(1) as f64
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {} MiB in {:.2} s ({:.0} MiB/s)",
            self.label,
            self.total >> 20,
            secs,
            (self.total >> 20) as f64 / secs.max(1e-9)
        );
    }
}
