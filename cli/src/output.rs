//! What goes to stdout: the proto3 JSON mapping of an answer with `--json`
//! (one object per line for streams), human text otherwise; plus the
//! helpers human output needs — times, tables, big digits, a countdown bar.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use twokey_proto::Timestamp;

use crate::error::CliError;

/// How to print answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// Print the proto3 JSON mapping and nothing else.
    pub json: bool,
}

impl Output {
    /// Prints `answer` as one line of JSON, or the human text.
    pub fn answer<T: serde::Serialize>(
        &self,
        answer: &T,
        human: impl FnOnce() -> String,
    ) -> Result<(), CliError> {
        if self.json {
            json_line(answer)
        } else {
            print(&human())
        }
    }
}

/// Writes `text` to stdout (a newline is added if missing).
pub fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    let res = if text.ends_with('\n') || text.is_empty() {
        out.write_all(text.as_bytes())
    } else {
        out.write_all(text.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
    };
    res.and_then(|()| out.flush()).map_err(stdout_error)
}

/// Writes one value as one line of JSON to stdout.
pub fn json_line<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    print(&to_json(value)?)
}

/// The JSON text of a value.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string(value).map_err(|e| CliError::Input(format!("cannot encode JSON: {e}")))
}

/// Maps a stdout write error; a closed pipe ends the command quietly.
pub fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::BrokenPipe
    } else {
        CliError::Io {
            action: "write",
            path: "stdout".into(),
            source: e,
        }
    }
}

/// True when stdout is a terminal.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// A timestamp as `2026-11-28 09:46:30Z` (UTC), or `-` when unset.
pub fn time(ts: Option<&Timestamp>) -> String {
    let Some(ts) = ts else {
        return "-".to_owned();
    };
    match twokey_runtime::time::from_timestamp(ts) {
        Some(t) => twokey_runtime::time::rfc3339(t).replacen('T', " ", 1),
        None => ts.seconds.to_string(),
    }
}

/// Parses a time for a filter: RFC 3339 (`2026-11-28T09:00:00Z`) or an age
/// such as `90s`, `15m`, `2h`, `7d` (that long before now).
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Some(ago) = parse_age(text) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let then = now.saturating_sub(ago.as_secs());
        return Ok(Timestamp {
            seconds: i64::try_from(then).unwrap_or(0),
            nanos: 0,
        });
    }
    serde_json::from_value::<Timestamp>(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!("{text:?} is not a time: use RFC 3339 (2026-11-28T09:00:00Z) or an age (90s, 15m, 2h, 7d)")
    })
}

fn parse_age(text: &str) -> Option<Duration> {
    twokey_runtime::time::parse_duration(text).ok()
}

/// Seconds from now until `ts` (negative when past).
pub fn seconds_until(ts: &Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    ts.seconds as f64 + f64::from(ts.nanos) / 1e9 - now
}

/// The short form of a SPIFFE ID: its path without the leading slash
/// (`user/alice`), or the text as it is.
pub fn short_id(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or(id, |(_, path)| path)
}

/// An enum's proto name in lower case without its prefix:
/// `REQUEST_STATE_PENDING` → `pending`.
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

/// At most `max` characters of one line of `text`, with `…` when cut.
pub fn ellipsize(text: &str, max: usize) -> String {
    let line = crate::error::one_line(text);
    if line.chars().count() <= max {
        line
    } else {
        let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// Lays out rows as columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

const FONT: [[&str; 5]; 10] = [
    ["█████", "█   █", "█   █", "█   █", "█████"],
    ["  █  ", " ██  ", "  █  ", "  █  ", " ███ "],
    ["█████", "    █", "█████", "█    ", "█████"],
    ["█████", "    █", " ████", "    █", "█████"],
    ["█   █", "█   █", "█████", "    █", "    █"],
    ["█████", "█    ", "█████", "    █", "█████"],
    ["█████", "█    ", "█████", "█   █", "█████"],
    ["█████", "    █", "   █ ", "  █  ", "  █  "],
    ["█████", "█   █", "█████", "█   █", "█████"],
    ["█████", "█   █", "█████", "    █", "█████"],
];

/// The code in big block digits, five rows, split in two halves.
pub fn big_digits(code: &str) -> String {
    let digits: Vec<&[&str; 5]> = code
        .chars()
        .filter_map(|c| c.to_digit(10).map(|d| &FONT[d as usize]))
        .collect();
    let half = digits.len().div_ceil(2);
    let mut rows = Vec::with_capacity(5);
    for row in 0..5 {
        let mut line = String::from("  ");
        for (i, glyph) in digits.iter().map(|d| d[row]).enumerate() {
            if i == half && digits.len() > 4 {
                line.push_str("   ");
            }
            line.push_str(glyph);
            line.push_str("  ");
        }
        rows.push(line.trim_end().to_owned());
    }
    rows.join("\n")
}

/// One frame of the countdown bar: `[██████░░░░]  17 s left`.
pub fn countdown_frame(remaining: u64, period: u64, width: usize) -> String {
    let period = period.max(1);
    let remaining = remaining.min(period);
    let filled = usize::try_from(remaining * width as u64 / period).unwrap_or(width);
    let mut bar = String::from("[");
    bar.extend(std::iter::repeat_n('█', filled));
    bar.extend(std::iter::repeat_n('░', width - filled));
    bar.push(']');
    format!("{bar} {remaining:>3} s left")
}

/// One frame while a code is not usable yet: `usable in 4 s, then for 30 s`.
pub fn usable_in_frame(until_usable: u64, window: u64) -> String {
    format!("usable in {until_usable} s, then for {window} s")
}

/// Redraws the countdown once a second on the current line: first to
/// `valid_from` when that is still ahead (`usable in 4 s, then for 30 s`),
/// then through the validity window until `valid_until`; then clears the
/// line and leaves the cursor at its start (the caller erases the code).
pub fn live_countdown(
    valid_from: Option<&Timestamp>,
    valid_until: &Timestamp,
    period: u32,
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    if let Some(from) = valid_from {
        let window = (valid_until.seconds - from.seconds).max(0).unsigned_abs();
        loop {
            let ahead = seconds_until(from);
            if ahead <= 0.0 {
                break;
            }
            let shown = ahead.ceil() as u64;
            write!(out, "\r\x1b[2K{}", usable_in_frame(shown, window))
                .and_then(|()| out.flush())
                .map_err(stdout_error)?;
            let frac = ahead - (shown as f64 - 1.0);
            std::thread::sleep(Duration::from_secs_f64(frac.clamp(0.05, 1.0)));
        }
    }
    loop {
        let left = seconds_until(valid_until);
        if left <= 0.0 {
            break;
        }
        let shown = left.ceil() as u64;
        write!(
            out,
            "\r\x1b[2K{}",
            countdown_frame(shown, u64::from(period), 30)
        )
        .and_then(|()| out.flush())
        .map_err(stdout_error)?;
        // Sleep to the next whole second of the remaining time.
        let frac = left - (shown as f64 - 1.0);
        std::thread::sleep(Duration::from_secs_f64(frac.clamp(0.05, 1.0)));
    }
    write!(out, "\r\x1b[2K").map_err(stdout_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc_without_fractions() {
        let ts = Timestamp {
            seconds: 1_795_859_190,
            nanos: 5,
        };
        assert_eq!(time(Some(&ts)), "2026-11-28 09:46:30Z");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn filter_times_take_rfc3339_and_ages() {
        assert_eq!(
            parse_time("2026-11-28T09:46:30Z").unwrap().seconds,
            1_795_859_190
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let two_hours_ago = parse_time("2h").unwrap().seconds;
        assert!((now - 7200 - two_hours_ago).abs() <= 2);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn short_ids_drop_scheme_and_trust_domain() {
        assert_eq!(short_id("spiffe://example.org/user/alice"), "user/alice");
        assert_eq!(short_id("alice"), "alice");
    }

    #[test]
    fn big_digits_have_five_rows_and_a_gap_between_halves() {
        let big = big_digits("123456");
        assert_eq!(big.lines().count(), 5);
        let first = big.lines().next().unwrap();
        assert!(first.contains("     "), "{first}");
    }

    #[test]
    fn the_countdown_bar_empties_as_time_runs_out() {
        assert_eq!(countdown_frame(30, 30, 10), "[██████████]  30 s left");
        assert_eq!(countdown_frame(15, 30, 10), "[█████░░░░░]  15 s left");
        assert_eq!(countdown_frame(0, 30, 10), "[░░░░░░░░░░]   0 s left");
    }

    #[test]
    fn before_its_window_the_countdown_says_when_the_code_is_usable() {
        assert_eq!(usable_in_frame(4, 30), "usable in 4 s, then for 30 s");
        assert_eq!(usable_in_frame(1, 60), "usable in 1 s, then for 60 s");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w");
    }
}
