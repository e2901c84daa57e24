//! Log output of the `dapt` and `dapt-worker` binaries: `tracing` lines on stderr, human text
//! or one JSON object per line (`--log-format json`), filtered by `RUST_LOG` (default `info`).
//!
//! Colour ([`ColorChoice`], `--color` / `DAPT_COLOR`): `auto` colours stderr only when it is a
//! terminal and `NO_COLOR` is unset or empty (<https://no-color.org>); `always` and `never` say
//! what they mean. Files, pipes, journald and `kubectl logs` get plain text under `auto`.
//!
//! In the text format a float field is written with 4 significant digits ([`significant`]);
//! the JSON format keeps every field at full precision. The formatting helpers here
//! ([`significant`], [`scientific`], [`clock`]) are what the coordinator's step line uses too.

use std::ffi::OsStr;
use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The shape of each log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: timestamp, level, message and `key=value` fields, floats rounded.
    #[default]
    Text,
    /// For machines: one JSON object per line, every field at full precision.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Whether log lines carry ANSI colour codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when the stream is a terminal and `NO_COLOR` is unset or empty.
    #[default]
    Auto,
    /// Colour even into a file or a pipe (and despite `NO_COLOR`).
    Always,
    /// Never colour.
    Never,
}

impl fmt::Display for ColorChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColorChoice::Auto => "auto",
            ColorChoice::Always => "always",
            ColorChoice::Never => "never",
        })
    }
}

impl ColorChoice {
    /// Whether to colour a stream that is (`terminal`) or is not a terminal, given the value of
    /// `NO_COLOR` (`None` when unset). An explicit `always` or `never` wins over `NO_COLOR`,
    /// as <https://no-color.org> asks.
    pub fn colors(self, terminal: bool, no_color: Option<&OsStr>) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => terminal && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    /// The choice for a child process whose stderr is a log file: files are never coloured
    /// unless colour was asked for with `always`.
    pub fn for_file(self) -> ColorChoice {
        match self {
            ColorChoice::Always => ColorChoice::Always,
            ColorChoice::Auto | ColorChoice::Never => ColorChoice::Never,
        }
    }
}

/// The logging flags both binaries take (`#[command(flatten)]`); global, so they go before or
/// after the subcommand.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr: text for people, json for machines (full precision).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Colour the log: auto (only on a terminal, and not when NO_COLOR is set), always, never.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "DAPT_COLOR",
        default_value_t = ColorChoice::Auto
    )]
    pub color: ColorChoice,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format [`init`] installed ([`LogFormat::Text`] before it, and in tests).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init(args: LogArgs) {
    let _ = FORMAT.set(args.log_format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR");
    let ansi = args
        .color
        .colors(std::io::stderr().is_terminal(), no_color.as_deref());
    // A log line that cannot be written (stderr a pipe whose reader exited, a full or immutable
    // log file) is dropped, never a panic: tracing-subscriber reports a failed write with
    // `eprintln!`, which panics when stderr itself fails, and that panic on a worker's training
    // thread hid its failure report and hung the job; on `dapt launch` it killed the run (an
    // audit: `dapt launch ... 2>&1 | head -30`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .log_internal_errors(false)
        .with_ansi(ansi);
    match args.log_format {
        // The module path says nothing to a person reading the job's log.
        LogFormat::Text => builder.with_target(false).fmt_fields(HumanFields).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Standard error that reports every write as done: a log line that cannot be written is lost,
/// and the program goes on (see [`init`]).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// `x` with `digits` significant digits: fixed-point for magnitudes in [1e-3, 1e6), scientific
/// (`3.044e-4`) outside; `NaN` and `inf` as such. `significant(5.9398393630981445, 4)` is
/// `5.940`, `significant(0.3555587054101867, 4)` is `0.3556`.
pub fn significant(x: f64, digits: u32) -> String {
    let digits = digits.max(1);
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".into();
    }
    let magnitude = x.abs();
    if !(1e-3..1e6).contains(&magnitude) {
        return scientific(x, digits);
    }
    let exponent = |m: f64| m.log10().floor() as i32;
    let mut e = exponent(magnitude);
    let decimals = |e: i32| (digits as i32 - 1 - e).max(0) as usize;
    let mut text = format!("{x:.*}", decimals(e));
    // Rounding may carry into a new digit (9.9996 -> 10.000): one fewer decimal then.
    let rounded: f64 = text.parse().unwrap_or(x);
    if exponent(rounded.abs()) > e {
        e += 1;
        text = format!("{x:.*}", decimals(e));
    }
    text
}

/// `x` in scientific notation with `digits` significant digits: `scientific(0.000304388, 3)` is
/// `3.04e-4`.
pub fn scientific(x: f64, digits: u32) -> String {
    format!("{x:.*e}", digits.max(1) as usize - 1)
}

/// A duration as a clock reading to the second: `42s`, `3m19s`, `1h02m` (minutes once it is
/// an hour or more).
pub fn clock(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A short duration (a step, a checkpoint): `0.84s`, `12.3s`, then [`clock`] from a minute.
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        clock(d)
    }
}

/// The text format's fields: tracing-subscriber's own, but floats with 4 significant digits.
struct HumanFields;

impl<'w> MakeVisitor<Writer<'w>> for HumanFields {
    type Visitor = HumanVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        HumanVisitor(DefaultVisitor::new(target, true))
    }
}

struct HumanVisitor<'w>(DefaultVisitor<'w>);

impl Visit for HumanVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0
            .record_debug(field, &format_args!("{}", significant(value, 4)))
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, value)
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.record_error(field, value)
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, value)
    }
}

impl VisitOutput<fmt::Result> for HumanVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for HumanVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// At most one log line per `period` for an event a stranger can repeat at will (a refused
/// connection, a failed handshake), so that a flood cannot fill the log's disk: [`Throttle::admit`]
/// says when to log, and how many such events the line stands for.
pub struct Throttle {
    period: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(period: std::time::Duration) -> Self {
        Throttle {
            period,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(n)` when it should be logged now, `n` being the events since
    /// the last line logged, this one included (the first event is always logged).
    pub fn admit(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => None,
            _ => {
                let n = state.1;
                *state = (Some(now), 0);
                Some(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_significant_digits() {
        assert_eq!(significant(5.9398393630981445, 4), "5.940");
        assert_eq!(significant(0.3555587054101867, 4), "0.3556");
        assert_eq!(significant(123.456, 4), "123.5");
        assert_eq!(significant(4833.2, 4), "4833");
        assert_eq!(significant(98765.4, 4), "98765");
        assert_eq!(significant(9.99996, 4), "10.00");
        assert_eq!(significant(-0.0123456, 4), "-0.01235");
        assert_eq!(significant(0.00030438887424672536, 4), "3.044e-4");
        assert_eq!(significant(2.5e7, 4), "2.500e7");
        assert_eq!(significant(0.0, 4), "0");
        assert_eq!(significant(f64::NAN, 4), "NaN");
        assert_eq!(significant(f64::INFINITY, 4), "inf");
    }

    #[test]
    fn lr_in_scientific_notation() {
        assert_eq!(scientific(0.00030438887424672536, 3), "3.04e-4");
        assert_eq!(scientific(0.003, 3), "3.00e-3");
    }

    #[test]
    fn clock_readings() {
        assert_eq!(clock(Duration::from_secs(0)), "0s");
        assert_eq!(clock(Duration::from_secs(59)), "59s");
        assert_eq!(clock(Duration::from_secs(199)), "3m19s");
        assert_eq!(clock(Duration::from_secs(3720)), "1h02m");
        assert_eq!(clock(Duration::from_secs(26 * 3600 + 5 * 60)), "26h05m");
        assert_eq!(seconds(Duration::from_millis(840)), "0.84s");
        assert_eq!(seconds(Duration::from_millis(12_340)), "12.3s");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        assert!(ColorChoice::Auto.colors(true, None));
        assert!(ColorChoice::Auto.colors(true, empty));
        assert!(!ColorChoice::Auto.colors(true, set));
        assert!(!ColorChoice::Auto.colors(false, None));
        assert!(ColorChoice::Always.colors(false, set));
        assert!(!ColorChoice::Never.colors(true, None));
        assert_eq!(ColorChoice::Auto.for_file(), ColorChoice::Never);
        assert_eq!(ColorChoice::Always.for_file(), ColorChoice::Always);
    }

    #[test]
    fn one_line_per_period_counting_what_it_stands_for() {
        let t = super::Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.admit(), Some(1));
        for _ in 0..1000 {
            assert_eq!(t.admit(), None);
        }
        let t = super::Throttle::new(std::time::Duration::from_millis(100));
        assert_eq!(t.admit(), Some(1));
        t.admit();
        t.admit();
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(
            t.admit(),
            Some(3),
            "the line stands for the events held back and itself"
        );
    }
}
