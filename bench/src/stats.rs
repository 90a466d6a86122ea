//! Latency samples and their summary: throughput and p50/p99/p99.9, plus a
//! driver that runs a bounded number of operations at a fixed concurrency.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// One measured scenario (or its baseline).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// Scenario group, e.g. `vault`.
    pub group: String,
    /// What was measured.
    pub name: String,
    /// True for the baseline a scenario is compared with.
    pub baseline: bool,
    /// Operations in flight.
    pub concurrency: usize,
    /// Operations that succeeded.
    pub ok: usize,
    /// Operations that failed.
    pub errors: usize,
    /// Wall time of the measured part, seconds.
    pub seconds: f64,
    /// Successful operations per second.
    pub per_second: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile latency, microseconds.
    pub p999_us: f64,
    /// The target, in words, if the issue sets one.
    pub target: String,
}

/// Percentile `p` (0..=100) of sorted samples, nearest rank; 0 when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Summarises latency samples of successful operations into a [`Row`].
pub fn summarise(
    group: &str,
    name: &str,
    baseline: bool,
    concurrency: usize,
    mut samples: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
) -> Row {
    samples.sort_unstable();
    let secs = elapsed.as_secs_f64().max(1e-9);
    Row {
        group: group.into(),
        name: name.into(),
        baseline,
        concurrency,
        ok: samples.len(),
        errors,
        seconds: secs,
        per_second: samples.len() as f64 / secs,
        p50_us: us(percentile(&samples, 50.0)),
        p99_us: us(percentile(&samples, 99.0)),
        p999_us: us(percentile(&samples, 99.9)),
        target: String::new(),
    }
}

/// Marks a measured phase on stderr, `twokey-bench: phase start: NAME`
/// now and `twokey-bench: phase end: NAME` when dropped, so a profiler can
/// be attached to exactly that phase (see `bench/profile-phase.sh`).
#[derive(Debug)]
pub struct Phase(String);

impl Phase {
    /// Prints the start marker.
    pub fn start(name: &str) -> Self {
        eprintln!("twokey-bench: phase start: {name}");
        Self(name.to_owned())
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        eprintln!("twokey-bench: phase end: {}", self.0);
    }
}

/// What [`drive`] measured.
#[derive(Debug, Default)]
pub struct Driven {
    /// Latency of each successful operation.
    pub samples: Vec<Duration>,
    /// Failed operations, with the first error message.
    pub errors: usize,
    /// The first error, for the log.
    pub first_error: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `op(i)` for i in 0..count with `concurrency` workers; stops early
/// once `limit` has passed. Every loop is bounded by count and time.
pub async fn drive<F, Fut>(count: usize, concurrency: usize, limit: Duration, op: F) -> Driven
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + limit;
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, op) = (next.clone(), op.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Driven::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() >= deadline {
                    return out;
                }
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => out.samples.push(t.elapsed()),
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }));
    }
    let mut all = Driven::default();
    for w in workers {
        match w.await {
            Ok(d) => {
                all.samples.extend(d.samples);
                all.errors += d.errors;
                if all.first_error.is_none() {
                    all.first_error = d.first_error;
                }
            }
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    all.elapsed = start.elapsed();
    // Operations skipped because time ran out count as failures.
    let done = all.samples.len() + all.errors;
    if done < count {
        all.errors += count - done;
        all.first_error
            .get_or_insert_with(|| format!("time limit {limit:?} reached after {done} of {count}"));
    }
    all
}

impl Driven {
    /// The row for these measurements.
    pub fn row(self, group: &str, name: &str, baseline: bool, concurrency: usize) -> Row {
        if let Some(e) = &self.first_error {
            eprintln!(
                "twokey-bench: {group}/{name}: {} failed, first: {e}",
                self.errors
            );
        }
        summarise(
            group,
            name,
            baseline,
            concurrency,
            self.samples,
            self.errors,
            self.elapsed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_micros(500));
        assert_eq!(percentile(&s, 99.0), Duration::from_micros(990));
        assert_eq!(percentile(&s, 99.9), Duration::from_micros(999));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
