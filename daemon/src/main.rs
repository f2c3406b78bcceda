//! The `ferry` command.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry::{
    dirty::store::{Store, DEFAULT_STATE_DIR},
    track::{DeviceReport, DirtyReport, Tracking},
    tracker::{
        linux::{LinuxTracker, DEFAULT_BPF_DIR},
        ChunkSize, Tracker,
    },
};

/// ferry keeps standby copies of a server's disks current by shipping only the
/// blocks that changed.
///
/// An eBPF program marks every write to a tracked block device in a per-device
/// bitmap, at submission and again at completion, so no write is missed. The
/// bitmaps are pinned in the kernel: tracking goes on while no ferry process
/// runs.
#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    /// Where ferry keeps its state: tracked devices and dirty sets not yet
    /// shipped (root-only).
    #[arg(long, global = true, env = "FERRY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    /// The bpffs directory the tracker is pinned under.
    #[arg(long, global = true, env = "FERRY_BPF_DIR", default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Track writes to block devices.
    #[command(subcommand)]
    Track(TrackCommand),
}

#[derive(Subcommand)]
enum TrackCommand {
    /// Start tracking a block device (a whole disk or a partition).
    ///
    /// Example: ferry track add /dev/sdb --chunk-size 64K
    Add {
        /// The block device, e.g. /dev/sdb or /dev/nvme0n1p2.
        device: PathBuf,
        /// Tracking granularity: a power of two from 4K to 1M. Smaller chunks
        /// ship less data per small write but need more bitmap memory
        /// (2 MiB per TiB at 64K).
        #[arg(long, default_value = "64K", value_parser = parse_chunk)]
        chunk_size: ChunkSize,
    },
    /// Stop tracking a device and forget its dirty set.
    Remove { device: PathBuf },
    /// List tracked devices: size, chunk size, dirty data, state, counters and
    /// bitmap memory.
    List(JsonFlag),
    /// Show a device's dirty extents without clearing them.
    ///
    /// Offsets and lengths are bytes relative to DEVICE. The set covers what
    /// ferry has persisted and what the kernel has marked since.
    Dirty {
        device: PathBuf,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show a device's dirty extents, then clear them.
    Drain {
        device: PathBuf,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show the tracker programs' run counts and run time (run time needs
    /// `sysctl kernel.bpf_stats_enabled=1`).
    Stats(JsonFlag),
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_chunk(s: &str) -> Result<ChunkSize, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // Bad input gets one clear line; --help has the rest.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("ferry: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("ferry: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes as one line, skipping causes the message
/// already contains.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Track(cmd) = cli.command;
    let tracker = LinuxTracker::new(&cli.bpf_dir)?;
    let open_store = |path: &Path| {
        Store::open(path).with_context(|| format!("cannot use state directory {}", path.display()))
    };
    let mut out = std::io::stdout().lock();
    match cmd {
        TrackCommand::Add { device, chunk_size } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            let r = t.add(&device, chunk_size)?;
            writeln!(
                out,
                "tracking {} ({}, chunk {}, bitmap {})",
                r.device.display(),
                human(r.size),
                ChunkSize::from_bytes(r.chunk_size).unwrap_or(chunk_size),
                human(r.bitmap_bytes)
            )?;
            if let Some(reason) = &r.reason {
                writeln!(out, "warning: needs-resync: {reason}")?;
            }
        }
        TrackCommand::Remove { device } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            t.remove(&device)?;
            writeln!(out, "stopped tracking {}", device.display())?;
        }
        TrackCommand::List(JsonFlag { json }) => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            let list = t.list()?;
            if json {
                serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "devices": list }))?;
                writeln!(out)?;
            } else {
                print_list(&mut out, &list)?;
            }
        }
        TrackCommand::Dirty { device, json } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            let r = t.dirty(&device)?;
            print_dirty(&mut out, &r, json.json)?;
        }
        TrackCommand::Drain { device, json } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            let r = t.drain(&device)?;
            print_dirty(&mut out, &r, json.json)?;
        }
        TrackCommand::Stats(JsonFlag { json }) => {
            let mut tracker = tracker;
            let programs = tracker.stats()?;
            if json {
                serde_json::to_writer(&mut out, &serde_json::json!({ "programs": programs }))?;
                writeln!(out)?;
            } else if programs.is_empty() {
                writeln!(out, "the tracker is not loaded")?;
            } else {
                for p in programs {
                    let per_run = p.run_time_ns.checked_div(p.run_count).unwrap_or(0);
                    writeln!(
                        out,
                        "{:<14} id {:<6} runs {:<12} run time {} ns ({per_run} ns/run)",
                        p.name, p.id, p.run_count, p.run_time_ns
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn print_list(out: &mut impl Write, list: &[DeviceReport]) -> anyhow::Result<()> {
    if list.is_empty() {
        writeln!(out, "no tracked devices")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<18} {:>10} {:>6} {:>22} {:>10} {:>10} {:>9} {:>10}  STATE",
        "DEVICE", "SIZE", "CHUNK", "DIRTY", "EVENTS", "WRITES", "OVERFLOWS", "BITMAP"
    )?;
    for d in list {
        let chunk =
            ChunkSize::from_bytes(d.chunk_size).map_or(d.chunk_size.to_string(), |c| c.to_string());
        let state = match &d.reason {
            Some(r) => format!("{}: {r}", d.state),
            None => d.state.to_owned(),
        };
        writeln!(
            out,
            "{:<18} {:>10} {:>6} {:>22} {:>10} {:>10} {:>9} {:>10}  {state}",
            d.device.display(),
            human(d.size),
            chunk,
            format!("{} ({} chunks)", human(d.dirty_bytes), d.dirty_chunks),
            d.counters.events,
            d.counters.writes,
            d.counters.overflows,
            human(d.bitmap_bytes),
        )?;
    }
    Ok(())
}

fn print_dirty(out: &mut impl Write, r: &DirtyReport, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    let state = match &r.reason {
        Some(reason) => format!("{}: {reason}", r.state),
        None => r.state.to_owned(),
    };
    writeln!(
        out,
        "{}: {} dirty in {} extents (chunk {}), {state}",
        r.device.display(),
        human(r.dirty_bytes),
        r.extents.len(),
        ChunkSize::from_bytes(r.chunk_size).map_or(r.chunk_size.to_string(), |c| c.to_string()),
    )?;
    if !r.extents.is_empty() {
        writeln!(out, "{:>16} {:>12}", "OFFSET", "LENGTH")?;
        for [offset, len] in &r.extents {
            writeln!(out, "{offset:>16} {len:>12}")?;
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
