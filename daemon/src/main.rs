//! The `ferry` command.

use std::{
    io::{IsTerminal, Write},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry::{
    agent::{
        self,
        task::{ExportReport, Task},
    },
    dirty::store::{Store, DEFAULT_STATE_DIR},
    human,
    pipeline::PipelineConfig,
    sync::{self, bootpoint::BootPointOptions, Mode, SyncError, SyncOptions},
    throttle::{self, IoPrio, RateLimiter},
    track::{DeviceReport, DirtyReport, TargetReport, TrackError, Tracking},
    tracker::{
        linux::{LinuxTracker, DEFAULT_BPF_DIR},
        ChunkSize, Tracker,
    },
    transport::{ConnectOptions, Endpoint, Password, Reuse, Secret, SshOptions, TargetUrl},
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
    /// Bring a standby image up to date with a block device.
    ///
    /// The first run seeds a new image with a full copy (all-zero chunks are
    /// skipped, so the image stays thin); later runs ship only the chunks
    /// written since. If tracking was interrupted, or the image holds data
    /// this source did not leave there, the run compares checksums of both
    /// sides and ships what differs, and says so. A device not tracked yet
    /// is tracked first.
    ///
    /// Nothing is forgotten until the target has written it to disk and
    /// acknowledged it: an interrupted run is completed by the next one.
    ///
    /// Examples:
    ///   ferry sync /dev/sdb file:///var/lib/standby/web.img
    ///   ferry sync /dev/sdb ssh://backup@kvm1/srv/standby/web.img --bwlimit 20M
    #[command(verbatim_doc_comment)]
    Sync(Box<SyncArgs>),
    /// Compare a block device with its standby image by checksums.
    ///
    /// Prints the byte ranges that differ. Exit status 0 if identical, 1 if
    /// not. The source keeps changing while it runs: verify right after a
    /// sync of a quiet device for a clean answer.
    Verify(VerifyArgs),
    /// List, revert to, or delete the boot points of a standby image.
    #[command(subcommand)]
    BootPoints(BootPointsCommand),
    /// Boot the standby image, or its boot point NAME, under qemu and watch
    /// the serial console for a text the guest prints once it is up.
    ///
    /// qemu runs where the image is (for an ssh:// target, on the target
    /// host), with TCG (no KVM needed) and -snapshot, so nothing is
    /// written; the image's lock is held meanwhile, so a sync waits its
    /// turn. Prints pass or fail and the console's last lines. Exit status
    /// 0 pass, 1 fail, 2 error. The guest must print to the first serial
    /// port (console=ttyS0 on Linux).
    ///
    /// Examples:
    ///   ferry boot-test file:///var/lib/standby/web.img
    ///   ferry boot-test file:///var/lib/standby/web.vmdk V20261121_215422 --expect 'web login:'
    ///   ferry boot-test ssh://root@kvm1/var/lib/standby/web.qcow2
    #[command(verbatim_doc_comment)]
    BootTest(BootTestArgs),
    /// Serve one sync session on stdin/stdout (ferry runs this on the target
    /// over SSH; there is no need to run it by hand).
    Agent {
        /// The directory images live in; the agent never touches anything
        /// outside it.
        #[arg(long)]
        root: PathBuf,
        /// After this session, stay for the next ones as the kept agent NAME
        /// (the source passes it when it keeps its SSH connection)
        #[arg(long, value_name = "NAME", hide = true)]
        keep: Option<String>,
        /// Be the kept agent NAME: serve sessions on its socket until idle
        #[arg(long, value_name = "NAME", hide = true, conflicts_with = "keep")]
        listen: Option<String>,
        /// How long a kept agent waits for the next session
        #[arg(long, value_name = "SECONDS", hide = true, default_value_t = 60)]
        idle: u64,
    },
}

#[derive(Subcommand)]
enum BootPointsCommand {
    /// Boot points of TARGET, oldest first: name, time, kind (crash- or
    /// app-consistent), source generation and disk size.
    List {
        /// The standby image, as given to `ferry sync`.
        target: TargetUrl,
        #[command(flatten)]
        ssh: SshArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the working image equal boot point NAME (which stays). The next
    /// sync runs a checksum resync. Refused while a sync holds the image.
    Revert {
        /// The standby image, as given to `ferry sync`.
        target: TargetUrl,
        /// The boot point (`ferry boot-points list` shows the names).
        name: String,
        #[command(flatten)]
        ssh: SshArgs,
    },
    /// Write boot point NAME as a standalone image OUT, whose extension
    /// picks the format: .raw/.img, .qcow2, .vmdk or .vhdx. qemu-img
    /// converts it where the image is: for an ssh:// TARGET, on the target
    /// host, and OUT is a file name written there beside the image.
    ///
    /// Examples:
    ///   ferry boot-points export file:///var/lib/standby/web.qcow2 V20261121_215422 /srv/web-monday.qcow2
    ///   ferry boot-points export ssh://root@kvm1/var/lib/standby/web.vhdx V20261121_215422 web-monday.vhdx
    #[command(verbatim_doc_comment)]
    Export {
        /// The standby image, as given to `ferry sync`.
        target: TargetUrl,
        /// The boot point (`ferry boot-points list` shows the names).
        name: String,
        /// The image to write: a path here for file://, a file name beside
        /// the image for ssh://. It must not exist.
        out: PathBuf,
        /// The qemu-img to convert with (on the target host for ssh://).
        #[arg(long, value_name = "PATH", default_value = "qemu-img")]
        qemu_img: PathBuf,
        #[command(flatten)]
        ssh: SshArgs,
    },
    /// Delete boot point NAME; the others keep their content.
    Delete {
        /// The standby image, as given to `ferry sync`.
        target: TargetUrl,
        /// The boot point (`ferry boot-points list` shows the names).
        name: String,
        #[command(flatten)]
        ssh: SshArgs,
    },
}

#[derive(Args)]
struct SyncArgs {
    /// The source block device, e.g. /dev/sdb.
    device: PathBuf,
    /// file:///DIR/IMAGE (this host) or ssh://USER@HOST[:PORT]/DIR/IMAGE.
    target: TargetUrl,
    /// Another disk of the same server and its own target, synced in the
    /// same job; repeat for more. With --boot-point every disk's boot point
    /// is taken at one instant (one freeze across all of them) and has the
    /// same name.
    #[arg(long = "disk", value_name = "DEVICE=TARGET", value_parser = parse_disk)]
    disks: Vec<(PathBuf, TargetUrl)>,
    /// Compare checksums of both sides and ship what differs, whatever the
    /// tracker says.
    #[arg(long)]
    resync: bool,
    /// Take over an image that another source wrote: checksums of both
    /// sides are compared and what differs is overwritten.
    #[arg(long)]
    force_new_source: bool,
    /// Chunk size if the device has to be tracked first: a power of two
    /// from 4K to 1M. 4K ships the least for small scattered writes (a
    /// database, a mail spool) at 32 MiB of kernel bitmap per TiB; 64K
    /// needs 2 MiB per TiB. [default: 64K]
    #[arg(long, value_parser = parse_chunk)]
    chunk_size: Option<ChunkSize>,
    /// Cap on bytes per second on the wire, e.g. 500K, 20M (0 = none).
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_size)]
    bwlimit: u64,
    /// Cap on bytes per second read from the source (0 = none).
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_size)]
    read_limit: u64,
    /// Cap on read operations per second on the source (0 = none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    read_iops: u64,
    /// I/O priority of the reads: idle, best-effort or best-effort:N (0 is
    /// highest, 7 lowest).
    #[arg(long, value_name = "CLASS")]
    ioprio: Option<IoPrio>,
    /// CPU niceness of the job (-20..19).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    nice: Option<i32>,
    /// zstd level (1 fast .. 19 small; 0 sends data uncompressed).
    #[arg(long, value_name = "N", default_value_t = 1)]
    zstd_level: i32,
    /// Compression threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    compress_threads: Option<usize>,
    /// Cap on data held in memory between reading and sending.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    mem_cap: u64,
    /// Largest single read from the source.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    max_io: u64,
    /// Reads in flight on the source.
    #[arg(long, value_name = "N", default_value_t = 16)]
    queue_depth: u32,
    #[command(flatten)]
    boot: BootPointArgs,
    #[command(flatten)]
    ssh: SshArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(next_help_heading = "Boot points")]
struct BootPointArgs {
    /// End the job with a boot point: one instant of the source, kept on the
    /// target. Filesystems mounted from the device are frozen for that
    /// instant (app-consistent); a device without one gets a
    /// crash-consistent boot point.
    #[arg(long)]
    boot_point: bool,
    /// Boot points to keep (1-30, at most 22 for qcow2). At the limit the
    /// two oldest are merged into one with the newer one's content.
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..=30))]
    max_boot_points: u16,
    /// Run before the freeze (quiesce the application); if it fails, no
    /// boot point is taken, but the changes are still shipped. Scripts see
    /// FERRY_PHASE (pre or post) and FERRY_DEVICE (MAJOR:MINOR of each
    /// disk, space-separated).
    #[arg(long, value_name = "SCRIPT")]
    pre_snapshot: Option<PathBuf>,
    /// Run after the thaw.
    #[arg(long, value_name = "SCRIPT")]
    post_snapshot: Option<PathBuf>,
    /// How long each script may run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    script_timeout: u64,
    /// Longest the filesystems may stay frozen, e.g. 2s or 500ms; past it
    /// they are thawed and the job tries again after another round.
    #[arg(long, value_name = "TIME", default_value = "2s", value_parser = parse_duration)]
    max_freeze: std::time::Duration,
    /// Freeze once a round has at most this much left to ship.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    converge: u64,
    /// Freeze after this many rounds, converged or not.
    #[arg(long, value_name = "N", default_value_t = 5)]
    max_rounds: u32,
}

#[derive(Args)]
struct VerifyArgs {
    /// The source block device.
    device: PathBuf,
    /// The standby image, as given to `ferry sync`.
    target: TargetUrl,
    #[command(flatten)]
    ssh: SshArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BootTestArgs {
    /// The standby image, as given to `ferry sync`.
    target: TargetUrl,
    /// The boot point to boot (default: the working image).
    name: Option<String>,
    /// The console text that means the guest is up.
    #[arg(long, value_name = "TEXT", default_value = ferry::boottest::DEFAULT_EXPECT)]
    expect: String,
    /// Seconds the guest gets to show it (TCG is slow: a full OS may need
    /// minutes).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// The qemu binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// How the disk is attached: virtio, sata or ide (a guest without virtio
    /// drivers, e.g. one from ESXi or Hyper-V, needs sata or ide).
    #[arg(long, value_name = "BUS", default_value = "virtio")]
    bus: ferry::boottest::Bus,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    memory: u32,
    #[command(flatten)]
    ssh: SshArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SshArgs {
    /// known_hosts file the target's host key is checked against.
    #[arg(long, value_name = "FILE", default_value = "~/.ssh/known_hosts")]
    known_hosts: String,
    /// Record the target's host key if known_hosts has none for it (a
    /// changed key is always refused).
    #[arg(long)]
    accept_new_host_key: bool,
    /// Private key to log in with (default: ssh-agent, then ~/.ssh/id_*).
    #[arg(long, short = 'i', value_name = "FILE")]
    identity: Option<PathBuf>,
    /// File holding the password or key passphrase; must be mode 0600.
    /// Or set FERRY_SSH_PASSWORD. Never given on the command line.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Keep the SSH connection open this long after the job (in the
    /// background, in a root-only socket under the state directory), and
    /// ferry's agent on the target with it, so the next job to the same
    /// target skips the key exchange, the login and starting the agent; 0
    /// closes both when the job ends. A job with another key, known_hosts
    /// or user makes its own connection.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        env = "FERRY_SSH_PERSIST",
        value_parser = parse_persist
    )]
    ssh_persist: std::time::Duration,
}

impl SshArgs {
    fn options(&self, state_dir: &Path) -> anyhow::Result<ConnectOptions> {
        let known_hosts = match self.known_hosts.strip_prefix("~/") {
            Some(rest) => std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(rest),
            None => PathBuf::from(&self.known_hosts),
        };
        // `ssh` runs in `/` (see `Destination::command`).
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        // Checked now for a clear error; `ssh` gets it later from ferry's
        // askpass run, which reads it again.
        let password = match &self.password_file {
            Some(path) => {
                Secret::from_file(path)?;
                Some(Password::File(absolute(path)))
            }
            None => Secret::from_env().map(|_| Password::Env),
        };
        Ok(ConnectOptions {
            ssh: SshOptions {
                known_hosts: Some(absolute(&known_hosts)),
                accept_new_host_key: self.accept_new_host_key,
                identity: self.identity.as_deref().map(absolute),
                password,
                connect_timeout: None,
                reuse: Some(Reuse {
                    dir: state_dir.join("ssh"),
                    persist: self.ssh_persist,
                }),
            },
        })
    }
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
    /// List the standby targets each device feeds: how much each is
    /// behind, its last acknowledged sync, and whether its next sync is a
    /// checksum resync.
    ///
    /// A target appears with its first `ferry sync` to it. BEHIND counts
    /// what was written on the device since the target's last acknowledged
    /// sync, in whole chunks, whether drained yet or not.
    Targets {
        /// Only this device's targets.
        device: Option<PathBuf>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Stop a device feeding a standby target: forget what the target
    /// still lacks.
    ///
    /// For a standby that is retired; nothing on the target is touched. A
    /// later sync to it is a checksum resync.
    ///
    /// Example: ferry track forget /dev/sdb ssh://backup@kvm1/srv/standby/web.img
    #[command(verbatim_doc_comment)]
    Forget { device: PathBuf, target: TargetUrl },
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

/// `--disk DEVICE=TARGET` (split at the first `=`: a target's query may
/// hold one).
fn parse_disk(s: &str) -> Result<(PathBuf, TargetUrl), String> {
    let (device, target) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not DEVICE=TARGET"))?;
    if device.is_empty() {
        return Err(format!("{s:?} names no device"));
    }
    let target = target.parse::<TargetUrl>().map_err(|e| e.to_string())?;
    Ok((PathBuf::from(device), target))
}

/// `500ms`, `2s`, `1.5s`, `10m`, `1h`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0 && v * scale < 1e9)
        .map(|v| std::time::Duration::from_secs_f64(v * scale))
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 2s, 10m or 1h"))
}

/// A duration, or `0` for none.
fn parse_persist(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().trim_end_matches(['s', 'm', 'h']) {
        "0" => Ok(std::time::Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// `4096`, `64K`, `20M`, `1G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size like 4096, 64K, 20M or 1G"))
}

fn main() -> ExitCode {
    if std::env::var_os(ferry::transport::ssh::ASKPASS_ENV).is_some() {
        return askpass();
    }
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
                .unwrap_or_else(|_| "warn,ferry=info".into()),
        )
        .with_writer(std::io::stderr)
        .event_format(Plain)
        .init();
    // `verify` and `boot-test` say "different" or "did not boot" with 1, so
    // their errors exit 2, as cmp's do.
    let trouble = match cli.command {
        Command::Verify(_) | Command::BootTest(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    };
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("ferry: {}", one_line(&err));
            trouble
        }
    }
}

/// Log lines as a command-line tool prints them: the message alone, with
/// `warning:` or `error:` in front where that matters.
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        match *event.metadata().level() {
            tracing::Level::ERROR => write!(writer, "ferry: error: ")?,
            tracing::Level::WARN => write!(writer, "ferry: warning: ")?,
            tracing::Level::DEBUG | tracing::Level::TRACE => {
                write!(writer, "{}: ", event.metadata().target())?
            }
            tracing::Level::INFO => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
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

fn agent_command(
    root: &Path,
    keep: Option<String>,
    listen: Option<String>,
    idle: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    if let Some(name) = listen {
        let dir = agent::kept::dir().map_err(anyhow::Error::msg)?;
        agent::kept::listen(root, &dir, &name, idle)
            .with_context(|| format!("kept agent {name}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Over SSH, stdin is sshd's pipe: at 1 MiB rather than 64 KiB, sshd
    // runs ahead of the agent's writes instead of waiting on it every few
    // frames (best effort; any other stdin is left be).
    ferry::sys::fd::grow_pipe(std::io::stdin().as_fd(), 1 << 20);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    if let Some(name) = keep {
        // The source reads this line before any frame.
        match agent::kept::start(root, &name, idle) {
            Ok(kept) => {
                let said = if kept.already {
                    agent::kept::STILL_KEPT
                } else {
                    agent::kept::KEPT
                };
                writeln!(stdout, "{said}{}", kept.socket.display())?
            }
            Err(why) => writeln!(stdout, "{}{why}", agent::kept::NOT_KEPT)?,
        }
    }
    agent::serve(root, stdin, stdout)?;
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cmd = match cli.command {
        Command::Track(cmd) => cmd,
        Command::Agent {
            root,
            keep,
            listen,
            idle,
        } => return agent_command(&root, keep, listen, std::time::Duration::from_secs(idle)),
        Command::Sync(args) => return sync_command(&cli.state_dir, &cli.bpf_dir, &args),
        Command::Verify(args) => return verify_command(&cli.state_dir, &args),
        Command::BootPoints(cmd) => return boot_points_command(&cli.state_dir, &cmd),
        Command::BootTest(args) => return boot_test_command(&cli.state_dir, &args),
    };
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
        TrackCommand::Targets { device, json } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            let list = t.targets(device.as_deref())?;
            if json.json {
                serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "targets": list }))?;
                writeln!(out)?;
            } else {
                print_targets(&mut out, &list)?;
            }
        }
        TrackCommand::Forget { device, target } => {
            let mut t = Tracking::new(tracker, open_store(&cli.state_dir)?);
            t.forget_target(&device, &target.to_string())?;
            writeln!(out, "{} no longer feeds {target}", device.display())?;
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
    Ok(ExitCode::SUCCESS)
}

fn sync_command(state_dir: &Path, bpf_dir: &Path, args: &SyncArgs) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.nice {
        throttle::apply_nice(n).context("cannot apply --nice")?;
    }
    let connect = args.ssh.options(state_dir)?;
    let limiter = |rate: u64| (rate > 0).then(|| Arc::new(RateLimiter::new(rate)));
    let mut pipeline = PipelineConfig {
        zstd_level: args.zstd_level,
        mem_cap: args.mem_cap,
        max_io: u32::try_from(args.max_io).context("--max-io is too large")?,
        queue_depth: args.queue_depth,
        read_bytes: limiter(args.read_limit),
        read_ops: limiter(args.read_iops),
        ioprio: args.ioprio,
        ..PipelineConfig::default()
    };
    if let Some(n) = args.compress_threads {
        pipeline.compress_threads = n.max(1);
    }
    let mut disks = vec![(args.device.clone(), args.target.clone())];
    disks.extend(args.disks.iter().cloned());
    for (i, (device, target)) in disks.iter().enumerate() {
        for (other, other_target) in &disks[..i] {
            if other == device {
                anyhow::bail!("{} is given twice", device.display());
            }
            if other_target == target {
                anyhow::bail!("{target} is given twice");
            }
        }
    }
    // A freeze must be thawed whatever ends the job, and whoever stops it
    // should know what became of the work.
    ferry::sys::freeze::guard_signals(
        "nothing is lost: what the target did not acknowledge is shipped by the next sync",
    )
    .context("cannot set up signal handling")?;
    let boot_point = if args.boot.boot_point {
        let mut devs = Vec::new();
        for (device, target) in &disks {
            let format = target.format();
            if usize::from(args.boot.max_boot_points) > format.max_boot_points() {
                anyhow::bail!(
                    "--max-boot-points {}: {} images keep at most {}",
                    args.boot.max_boot_points,
                    format.name(),
                    format.max_boot_points()
                );
            }
            devs.push(ferry::device::BlockDevice::resolve(device)?.dev);
        }
        Some(BootPointOptions {
            max_boot_points: args.boot.max_boot_points,
            pre_snapshot: args.boot.pre_snapshot.clone(),
            post_snapshot: args.boot.post_snapshot.clone(),
            script_timeout: std::time::Duration::from_secs(args.boot.script_timeout),
            max_freeze: args.boot.max_freeze,
            converge_bytes: args.boot.converge,
            max_rounds: args.boot.max_rounds.max(1),
            devs,
        })
    } else {
        None
    };
    let jobs: Vec<SyncOptions> = disks
        .into_iter()
        .map(|(device, target)| SyncOptions {
            boot_point: boot_point.clone(),
            device,
            target,
            state_dir: state_dir.to_owned(),
            chunk: args.chunk_size,
            resync: args.resync,
            force_new_source: args.force_new_source,
            connect: connect.clone(),
            pipeline: pipeline.clone(),
            bwlimit: args.bwlimit,
            progress_bar: std::io::stderr().is_terminal() && !args.json,
        })
        .collect();
    let summaries = sync::run_all(&jobs, || {
        let tracker = LinuxTracker::new(bpf_dir).map_err(TrackError::from)?;
        let store = Store::open(state_dir).map_err(SyncError::from)?;
        Ok(Tracking::new(tracker, store))
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        // One disk: its summary; several: a list of them.
        match summaries.as_slice() {
            [one] => serde_json::to_writer(&mut out, one)?,
            all => serde_json::to_writer(&mut out, all)?,
        }
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    for s in &summaries {
        print_summary(&mut out, s)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The text report of one disk of a job.
fn print_summary(out: &mut impl Write, s: &sync::SyncSummary) -> anyhow::Result<()> {
    writeln!(
        out,
        "{} {} -> {}: changed {}, sent {}, zeros skipped {}, compression {:.2}x, {:.1} s, {}/s, \
         resync {}",
        match s.mode {
            Mode::Seed => "seeded",
            Mode::Incremental => "synced",
            Mode::Resync => "resynced",
        },
        s.device.display(),
        s.target,
        human(s.changed_bytes),
        human(s.sent_bytes),
        human(s.zero_bytes),
        s.compression_ratio,
        s.duration_secs,
        human(s.throughput_bytes_per_sec as u64),
        match (&s.resync_reason, s.differing_bytes) {
            (Some(r), Some(d)) => format!("yes ({r}; {} differed)", human(d)),
            _ => "no".to_owned(),
        },
    )?;
    if let Some(bp) = &s.boot_point {
        let rounds: Vec<String> = bp.rounds.iter().map(|b| human(*b)).collect();
        match &bp.name {
            Some(name) => writeln!(
                out,
                "boot point {name} ({}), frozen {:.0} ms ({}), rounds: {}{}",
                bp.kind,
                bp.freeze_ms,
                if bp.frozen.is_empty() {
                    "nothing mounted".to_owned()
                } else {
                    bp.frozen
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                rounds.join(" + "),
                bp.merged
                    .as_ref()
                    .map(|m| format!("; merged {m} into the next one"))
                    .unwrap_or_default(),
            )?,
            None => writeln!(
                out,
                "no boot point taken: {}",
                bp.note.as_deref().unwrap_or("unknown reason")
            )?,
        }
        if let (Some(_), Some(note)) = (&bp.name, &bp.note) {
            writeln!(out, "note: {note}")?;
        }
    }
    Ok(())
}

fn boot_points_command(state_dir: &Path, cmd: &BootPointsCommand) -> anyhow::Result<ExitCode> {
    use ferry::protocol::ManageOp;
    let (target, ssh, op, name, json) = match cmd {
        BootPointsCommand::Export {
            target,
            name,
            out,
            qemu_img,
            ssh,
        } => return export_command(target, name, out, qemu_img, ssh, state_dir),
        BootPointsCommand::List { target, ssh, json } => (target, ssh, ManageOp::List, "", *json),
        BootPointsCommand::Revert { target, name, ssh } => {
            (target, ssh, ManageOp::Revert, name.as_str(), false)
        }
        BootPointsCommand::Delete { target, name, ssh } => {
            (target, ssh, ManageOp::Delete, name.as_str(), false)
        }
    };
    let list = sync::manage::manage(target, &ssh.options(state_dir)?, op, name)?;
    let mut out = std::io::stdout().lock();
    match op {
        ManageOp::Revert => writeln!(
            out,
            "{target} is now boot point {name}; the next sync compares checksums"
        )?,
        ManageOp::Delete => writeln!(out, "deleted boot point {name} of {target}")?,
        _ if json => {
            serde_json::to_writer(&mut out, &list)?;
            writeln!(out)?;
        }
        _ if list.boot_points.is_empty() => writeln!(out, "{target} has no boot points")?,
        _ => {
            writeln!(
                out,
                "{:<18} {:<20} {:<8} {:>10} {:>10}",
                "NAME", "TAKEN (UTC)", "KIND", "GENERATION", "SIZE"
            )?;
            for p in &list.boot_points {
                writeln!(
                    out,
                    "{:<18} {:<20} {:<8} {:>10} {:>10}",
                    p.name,
                    if p.created_at == 0 {
                        "-".to_owned()
                    } else {
                        let n = ferry::image::boot_point_name(p.created_at);
                        format!(
                            "{}-{}-{} {}:{}:{}",
                            &n[1..5],
                            &n[5..7],
                            &n[7..9],
                            &n[10..12],
                            &n[12..14],
                            &n[14..16]
                        )
                    },
                    p.kind,
                    p.generation,
                    human(p.size)
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn export_command(
    target: &TargetUrl,
    name: &str,
    out: &Path,
    qemu_img: &Path,
    ssh: &SshArgs,
    state_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let (path, format) = match &target.endpoint {
        Endpoint::Local => {
            let format = ferry::export::export(target, name, out, qemu_img)?;
            (out.display().to_string(), format.to_owned())
        }
        Endpoint::Ssh { host, .. } => {
            let file = out.to_str().filter(|o| !o.contains('/')).with_context(|| {
                format!(
                    "{}: for an ssh:// target OUT is a file name: the export is written on \
                         {host}, beside the image",
                    out.display()
                )
            })?;
            ferry::export::output_format(out)?;
            let task = Task::Export {
                point: name.to_owned(),
                out: file.to_owned(),
                qemu_img: qemu_img.to_owned(),
            };
            let r: ExportReport =
                sync::manage::task(target, &ssh.options(state_dir)?, &task, "an export report")?;
            (format!("{host}:{}", r.path.display()), r.format)
        }
    };
    writeln!(
        std::io::stdout(),
        "wrote boot point {name} of {target} to {path} ({format})"
    )?;
    Ok(ExitCode::SUCCESS)
}

fn verify_command(state_dir: &Path, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let connect = args.ssh.options(state_dir)?;
    let bar = std::io::stderr().is_terminal() && !args.json;
    let r = sync::verify::verify(&args.device, &args.target, &connect, bar)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &r)?;
        writeln!(out)?;
    } else if r.identical {
        writeln!(
            out,
            "{} and {} are identical ({} compared)",
            r.device.display(),
            r.target,
            human(r.compared_bytes)
        )?;
    } else {
        writeln!(
            out,
            "{} and {} differ: {} in {} ranges",
            r.device.display(),
            r.target,
            human(r.differing_bytes),
            r.ranges.len()
        )?;
        writeln!(out, "{:>16} {:>12}", "OFFSET", "LENGTH")?;
        for [offset, len] in &r.ranges {
            writeln!(out, "{offset:>16} {len:>12}")?;
        }
    }
    Ok(if r.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn boot_test_command(state_dir: &Path, args: &BootTestArgs) -> anyhow::Result<ExitCode> {
    use ferry::boottest::{self, BootTestOptions, Outcome};
    if args.expect.is_empty() {
        anyhow::bail!("--expect needs a text to watch for");
    }
    if args.timeout == 0 {
        anyhow::bail!("--timeout must be at least 1 second");
    }
    let opts = BootTestOptions {
        expect: args.expect.clone(),
        timeout: std::time::Duration::from_secs(args.timeout),
        qemu: args.qemu.clone(),
        bus: args.bus,
        memory_mib: args.memory,
        ..BootTestOptions::new(args.name.clone())
    };
    let what = match &args.name {
        Some(name) => format!("boot point {name} of {}", args.target),
        None => args.target.to_string(),
    };
    let r = match args.target.endpoint {
        Endpoint::Local => boottest::boot_test(&args.target, &opts).map_err(anyhow::Error::from),
        Endpoint::Ssh { .. } => sync::manage::task(
            &args.target,
            &args.ssh.options(state_dir)?,
            &Task::BootTest(opts),
            "a boot test report",
        )
        .map_err(anyhow::Error::from),
    }
    .with_context(|| format!("boot-test of {what}"))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &r)?;
        writeln!(out)?;
    } else {
        let booted = match &r.snapshot {
            Some(s) => format!("{} ({}, snapshot {s})", r.file, r.format),
            None => format!("{} ({})", r.file, r.format),
        };
        let why = match r.outcome {
            Outcome::Seen => format!("the console showed {:?}", r.expect),
            Outcome::GuestStopped => format!("the guest stopped without showing {:?}", r.expect),
            Outcome::TimedOut => format!("no {:?} within {} s", r.expect, args.timeout),
        };
        writeln!(
            out,
            "{}: {what}, booted {booted}: {why} ({:.1} s)",
            if r.passed { "pass" } else { "fail" },
            r.seconds
        )?;
        writeln!(out, "--- console, last {} lines ---", r.console_tail.len())?;
        for line in &r.console_tail {
            writeln!(out, "{line}")?;
        }
    }
    Ok(if r.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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

fn print_targets(out: &mut impl Write, list: &[TargetReport]) -> anyhow::Result<()> {
    if list.is_empty() {
        writeln!(
            out,
            "no targets (a device gets one with its first `ferry sync` to it)"
        )?;
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    writeln!(
        out,
        "{:<18} {:<48} {:>10} {:<36} {:>6}  STATE",
        "DEVICE", "TARGET", "BEHIND", "LAST SYNC", "GEN"
    )?;
    for t in list {
        let last = t.last_sync.map_or("never".to_owned(), |at| {
            format!("{} ({} ago)", ferry::Utc::at(at), ferry::ago(at, now))
        });
        let state = match &t.reason {
            Some(r) => format!("{}: {r}", t.state),
            None => t.state.to_owned(),
        };
        writeln!(
            out,
            "{:<18} {:<48} {:>10} {:<36} {:>6}  {state}",
            t.device.display(),
            t.target,
            human(t.behind_bytes),
            last,
            t.generation,
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

/// ferry as `ssh`'s askpass program (ferry sets this up for `ssh` when a
/// password is given): the prompt is the one argument, the answer goes to
/// stdout.
fn askpass() -> ExitCode {
    let prompt = std::env::args().nth(1).unwrap_or_default();
    match ferry::transport::ssh::askpass(&prompt) {
        Ok(secret) => {
            println!("{}", secret.expose());
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("ferry: {reason}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_duration, parse_persist};

    #[test]
    fn durations_take_the_units_people_type() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration(" 2h "), Ok(Duration::from_secs(7200)));
        for bad in ["", "0", "-1s", "ten", "5d", "1e300h", "NaNs"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("is not a duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_kept_connection_of_zero_means_none() {
        for zero in ["0", "0s", "0m", "0h"] {
            assert_eq!(parse_persist(zero), Ok(Duration::ZERO), "{zero:?}");
        }
        assert_eq!(parse_persist("10m"), Ok(Duration::from_secs(600)));
    }
}
