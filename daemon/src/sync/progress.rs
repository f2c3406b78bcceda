//! Progress of a job: a bar with bytes, rate and ETA on a terminal, log
//! lines every few seconds otherwise.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    phase: &'static str,
    total: u64,
    done: u64,
    last_log: Instant,
    started: Instant,
}

impl Progress {
    pub fn new(bar: bool) -> Self {
        let bar = bar.then(|| {
            let b = ProgressBar::new(0);
            b.set_style(style(0));
            b.set_message("starting");
            b
        });
        Self {
            bar,
            phase: "",
            total: 0,
            done: 0,
            last_log: Instant::now(),
            started: Instant::now(),
        }
    }

    /// Starts a phase of `total` bytes.
    pub fn phase(&mut self, name: &'static str, total: u64) {
        self.phase = name;
        self.total = total;
        self.done = 0;
        self.started = Instant::now();
        self.last_log = Instant::now();
        match &self.bar {
            Some(b) => {
                // Length first: each call may draw, and a bar drawn with
                // the new style over the old length reads "0 B/0 B".
                b.set_length(total);
                b.set_position(0);
                b.reset_eta();
                b.reset_elapsed();
                b.set_style(style(total));
                b.set_message(name);
            }
            None if total > 0 => tracing::info!("{name}: {} to go", crate::human(total)),
            None => tracing::info!("{name}"),
        }
    }

    pub fn set(&mut self, done: u64) {
        self.done = done;
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                "{}: {} of {} ({}/s)",
                self.phase,
                crate::human(done),
                crate::human(self.total),
                crate::human((done as f64 / secs) as u64)
            );
        }
    }

    /// A line that must be seen whatever the output is.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A bar with bytes, rate and ETA for a phase of known size; for one
/// without (connecting, committing) only the time it has taken, instead of
/// a full bar over "0 B/0 B".
fn style(total: u64) -> ProgressStyle {
    let template = if total > 0 {
        "{msg:>22} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
    } else {
        "{msg:>22} {elapsed}"
    };
    ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ")
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }
}
