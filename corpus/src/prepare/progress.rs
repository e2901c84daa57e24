//! Progress of `prepare`: a bar on a terminal, a log line every few seconds otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A progress bar on a terminal, a log line every few seconds otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    enabled: bool,
    what: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    pub(super) fn new(enabled: bool, total: u64, what: &'static str) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        Progress {
            bar,
            enabled,
            what,
            total,
            done: 0,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    pub(super) fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.enabled && self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                done_mb = self.done as f64 / 1e6,
                total_mb = self.total as f64 / 1e6,
                mb_per_s = self.done as f64 / 1e6 / secs,
                "{}",
                self.what
            );
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
