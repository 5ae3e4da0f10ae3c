//! Command-line flags and environment variables of `drover-server`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flagfile::FlagFile;

/// The server's config file (`--config FILE` or `DROVER_CONFIG`): `key = value` lines
/// named like the flags below (`listen = 0.0.0.0:8080`, `require-signatures = true`).
pub const CONFIG_FILE: FlagFile = FlagFile {
    env: "DROVER_CONFIG",
    switches: &["require-signatures"],
};

/// What `drover-server` does instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Copy the SQLite database into FILE while the server runs (a consistent copy;
    /// the server goes on meanwhile). For PostgreSQL use pg_dump.
    Backup {
        /// A new file to write the copy to
        file: PathBuf,
    },
    /// Put the database in FILE in place of the server's (the server must be stopped);
    /// the database it replaces is kept beside it
    Restore {
        /// A backup made by `drover-server backup`
        file: PathBuf,
    },
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-29T05:00:00Z  INFO dispatching update agent=… task=…`
    Text,
    /// `{"timestamp":…,"level":"INFO","message":"dispatching update","agent":"…",…}`
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-server",
    version,
    about = "Drover fleet update server",
    args_override_self = true
)]
pub struct Args {
    /// Config file of `key = value` lines named like these flags; a flag on the command
    /// line wins over it, and it wins over environment variables
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on (use port 0 for any free port)
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Directory for the SQLite database and generated token files
    #[arg(
        long,
        env = "DROVER_DATA_DIR",
        default_value = "./drover-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB; default: drover.db in the
    /// data directory
    #[arg(long, env = "DROVER_DATABASE_URL", global = true)]
    pub database: Option<String>,

    /// Without a command, the server runs
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Directory holding agent builds and their sidecars
    #[arg(long, env = "DROVER_DOWNLOADS", default_value = "./downloads")]
    pub downloads: PathBuf,

    /// URL agents use to reach this server (default: derived from --listen)
    #[arg(long, env = "DROVER_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// A web server or CDN holding copies of the offered builds (`drover mirror sync`),
    /// for agents whose site and client set no mirror of their own; agents verify what
    /// it serves and fall back to this server
    #[arg(long, env = "DROVER_DOWNLOAD_URL", value_parser = crate::mirrors::check_base)]
    pub download_url: Option<String>,

    /// Log lines as `text` (for people) or `json` (one object a line, for log
    /// collectors); which lines is set with RUST_LOG (default `info,sqlx=warn`)
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How often agents heartbeat: seconds, or a duration such as 30s or 5m
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Downloads served at once; more get 503 with Retry-After, and 0 serves none
    #[arg(long, env = "DROVER_MAX_CONCURRENT_DOWNLOADS", default_value_t = 64)]
    pub max_concurrent_downloads: usize,

    /// zstd level (1 to 19) of the compressed copy made once of each build, which agents
    /// download instead of the build; 0 serves builds only as they are
    #[arg(long, env = "DROVER_COMPRESSION_LEVEL", default_value_t = crate::DEFAULT_COMPRESSION_LEVEL, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub compression_level: i32,

    /// Deltas to each new build start from this many of the versions most agents run
    /// (per os/arch), made at --compression-level; 0 (or compression level 0) makes none
    #[arg(long, env = "DROVER_DELTA_BASES", default_value_t = crate::DEFAULT_DELTA_BASES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=16))]
    pub delta_bases: usize,

    /// Downloads one source address (IPv6: its /64) may hold at once; default three
    /// quarters of --max-concurrent-downloads, rounded up
    #[arg(long, env = "DROVER_MAX_DOWNLOADS_PER_ADDRESS")]
    pub max_downloads_per_address: Option<usize>,

    /// Connections held at once; default the open-files limit less 128 and a 128th of it,
    /// kept for the database, builds and logs
    #[arg(long, env = "DROVER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Connections one source address (IPv6: its /64) may hold at once; default half of
    /// --max-connections (behind NAT a whole site shares one address)
    #[arg(long, env = "DROVER_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,

    /// A request's headers must arrive within this, and an idle keep-alive connection
    /// is closed after it
    #[arg(long, env = "DROVER_HEADER_TIMEOUT", default_value = "15s", value_parser = parse_interval)]
    pub header_timeout: Duration,

    /// A connection whose peer accepts no bytes for this long is dropped (a download or
    /// event stream that makes no progress frees its slot)
    #[arg(long, env = "DROVER_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_interval)]
    pub write_timeout: Duration,

    /// An update task without progress for this long is timed out (a reconnect sends
    /// it again without counting against it)
    #[arg(long, env = "DROVER_TASK_TIMEOUT", default_value = "10m", value_parser = parse_interval)]
    pub task_timeout: Duration,

    /// Channel of builds without a .channel sidecar (stable or beta)
    #[arg(long, env = "DROVER_DEFAULT_CHANNEL", default_value = "stable")]
    pub default_channel: String,

    /// Offer only builds with a .sig signature document (written by `drover sign`)
    #[arg(long, env = "DROVER_REQUIRE_SIGNATURES")]
    pub require_signatures: bool,

    /// Beta successes a promote needs (the health gate): beta agents that stayed
    /// connected on the new version through the success bake
    #[arg(long, env = "DROVER_GATE_MIN_SUCCESSES", default_value_t = 3)]
    pub gate_min_successes: u64,

    /// Build failures over finished beta updates must stay under this share, 0 to 1
    /// (the health gate)
    #[arg(long, env = "DROVER_GATE_MAX_FAILURE_RATE", default_value_t = 0.1, value_parser = parse_fraction)]
    pub gate_max_failure_rate: f64,

    /// Unfinished beta updates over beta targets may not exceed this share, 0 to 1 (the
    /// health gate)
    #[arg(long, env = "DROVER_GATE_MAX_UNFINISHED", default_value_t = 0.5, value_parser = parse_fraction)]
    pub gate_max_unfinished: f64,

    /// How long a new version must stay connected before its success counts for the gate
    #[arg(long, env = "DROVER_SUCCESS_BAKE", default_value = "5m", value_parser = parse_bake)]
    pub success_bake: Duration,

    /// Waves of a promote that names none: cumulative shares of its targets, percentages
    /// or agent counts, the last 100% (the first, as a percentage, is a canary of 1 to
    /// 50 agents)
    #[arg(long, env = "DROVER_DEFAULT_WAVES", default_value = "1%,10%,50%,100%", value_parser = check_waves)]
    pub default_waves: String,

    /// How long a wave that passed its thresholds bakes before the next one starts
    #[arg(long, env = "DROVER_WAVE_BAKE", default_value = "10m", value_parser = parse_bake)]
    pub wave_bake: Duration,

    /// Build failures over finished updates in a wave above which its rollout halts, 0 to 1
    #[arg(long, env = "DROVER_HALT_FAILURE_RATE", default_value_t = 0.1, value_parser = parse_fraction)]
    pub halt_failure_rate: f64,

    /// Finished updates in a wave before the failure rate can halt it (fewer in a smaller
    /// wave: all of its agents)
    #[arg(long, env = "DROVER_HALT_MIN_ATTEMPTS", default_value_t = 5)]
    pub halt_min_attempts: u64,

    /// More build failures than this in one wave halt its rollout whatever the rate
    #[arg(long, env = "DROVER_HALT_MAX_FAILURES")]
    pub halt_max_failures: Option<u64>,

    /// The share of a wave's agents (those not skipped) that must succeed before it
    /// passes, 0 to 1
    #[arg(long, env = "DROVER_WAVE_MIN_SUCCESS_SHARE", default_value_t = 0.5, value_parser = parse_fraction)]
    pub wave_min_success_share: f64,

    /// After an update failed for a reason other than the build (busy server, full
    /// disk), it is offered to that agent again after this long
    #[arg(long, env = "DROVER_RETRY_DELAY", default_value = "1m", value_parser = parse_bake)]
    pub retry_delay: Duration,

    /// A machine enrolling again is re-bound to its record only once that record has
    /// been offline and silent this long; before, the enrollment is refused as a
    /// fingerprint conflict (a clone, or someone taking over its identity)
    #[arg(long, env = "DROVER_REBIND_AFTER", default_value = "10m", value_parser = parse_bake)]
    pub rebind_after: Duration,

    /// Warn when beta has been ahead of stable for longer than this (e.g. 7d)
    #[arg(long, env = "DROVER_STALE_STABLE_AFTER", default_value = "7d", value_parser = parse_age)]
    pub stale_stable_after: Duration,

    /// How often agents per version are counted for the adoption chart
    #[arg(long, env = "DROVER_SNAPSHOT_INTERVAL", default_value = "10m", value_parser = parse_interval)]
    pub snapshot_interval: Duration,

    /// Serve /metrics only to requests with `Authorization: Bearer TOKEN` (at least 32
    /// characters); without it /metrics is open to whoever reaches the server
    #[arg(long, env = "DROVER_METRICS_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub metrics_token: Option<String>,

    /// Finished update tasks older than this are deleted (0 keeps them); a closed
    /// rollout's counts are kept, and so are build failures
    #[arg(long, env = "DROVER_RETAIN_TASKS", default_value = "90d", value_parser = parse_age)]
    pub retain_tasks: Duration,

    /// Audit entries older than this are deleted (0 keeps them)
    #[arg(long, env = "DROVER_RETAIN_AUDIT", default_value = "365d", value_parser = parse_age)]
    pub retain_audit: Duration,

    /// Adoption snapshots older than this are deleted (0 keeps them)
    #[arg(long, env = "DROVER_RETAIN_SNAPSHOTS", default_value = "365d", value_parser = parse_age)]
    pub retain_snapshots: Duration,

    /// How often old rows are pruned, in small batches
    #[arg(long, env = "DROVER_PRUNE_INTERVAL", default_value = "1h", value_parser = parse_interval)]
    pub prune_interval: Duration,

    /// How often the downloads directory is rescanned even without change events
    #[arg(long, env = "DROVER_RESCAN_INTERVAL", default_value = "60s", value_parser = parse_interval)]
    pub rescan_interval: Duration,

    /// Enrollment attempts accepted from one source address: N at once, refilled over
    /// the period (N/PERIOD, e.g. 6000/1m), or off
    #[arg(long, env = "DROVER_ENROLL_LIMIT", default_value = "6000/1m", value_parser = crate::limits::Rate::parse)]
    pub enroll_limit: crate::limits::Rate,

    /// Failed enrollment attempts (bad token) from one source address, after which it is
    /// refused until the limit refills (N/PERIOD, e.g. 20/1m), or off
    #[arg(long, env = "DROVER_ENROLL_FAILURE_LIMIT", default_value = "20/1m", value_parser = crate::limits::Rate::parse)]
    pub enroll_failure_limit: crate::limits::Rate,

    /// PEM certificate chain (server certificate first): serve HTTPS and WSS with it
    #[arg(
        long,
        env = "DROVER_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert
    #[arg(
        long,
        env = "DROVER_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

/// Accepts bare seconds (`30`) or a duration with a unit (`30s`, `5m`, `1h`).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like 30, 30s or 5m: {e}"))?,
    };
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(24 * 3600) {
        return Err(format!("{text:?} is out of range: use 1s to 24h"));
    }
    Ok(duration)
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{text:?} is not a number from 0 to 1"))
}

/// A bake or delay: like `parse_interval`, but 0 is allowed (no bake) and weeks are too.
fn parse_bake(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "0" | "0s" => Ok(Duration::ZERO),
        _ => parse_age(text),
    }
}

/// `1%,10%,50%,100%`: a plan's waves, checked as a plan would be.
fn check_waves(text: &str) -> Result<String, String> {
    crate::rollouts::plan::Plan::from_text(text, 0, Default::default())?;
    Ok(text.to_owned())
}

/// Like `parse_interval`, without the upper bound: ages run to weeks.
/// A token an operator chose: long enough not to be guessed.
fn parse_secret(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.chars().count() < 32 {
        return Err(format!(
            "is {} characters long; use at least 32 (for example `openssl rand -hex 32`)",
            text.chars().count()
        ));
    }
    Ok(text.to_owned())
}

fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like 12h or 7d: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        let cases = [
            ("30", Ok(30)),
            ("30s", Ok(30)),
            ("5m", Ok(300)),
            (" 1h ", Ok(3600)),
            ("0", Err(())),
            ("25h", Err(())),
            ("soon", Err(())),
            ("500ms", Err(())),
        ];
        for (input, expected) in cases {
            let got = parse_interval(input).map(|d| d.as_secs()).map_err(|_| ());
            assert_eq!(got, expected, "{input:?}");
        }
    }

    #[test]
    fn tls_takes_both_the_certificate_and_the_key_or_neither() {
        let parse = |args: &[&str]| {
            Args::try_parse_from([&["drover-server"], args].concat()).map_err(|e| e.to_string())
        };
        let both = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(both.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(both.tls_key, Some(PathBuf::from("k.pem")));
        assert!(
            parse(&["--tls-cert", "c.pem"])
                .unwrap_err()
                .contains("--tls-key")
        );
        assert!(
            parse(&["--tls-key", "k.pem"])
                .unwrap_err()
                .contains("--tls-cert")
        );
    }
}
