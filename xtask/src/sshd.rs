//! A private sshd on 127.0.0.1 for benches: its own host key, one
//! authorized user key and its own config in a directory of ours, the
//! matching known_hosts line, and `ssh` options that use them. Stopped in
//! `Drop`, on error and after an interrupt too.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys::{self, Cpus};
use crate::util::{self, say, shell_quote, Cmd};

/// sshd refuses to re-exec itself unless started by absolute path.
const SSHD: &str = "/usr/sbin/sshd";
pub const HOST: &str = "127.0.0.1";

/// An sshd on 127.0.0.1 with its own host key, one authorized user key and
/// its own config, all in a private directory; stopped on drop.
pub struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
}

impl Sshd {
    /// Starts it in `dir`, which it creates, with `ferry` first on its
    /// sessions' PATH; pinned, with everything it starts, to `cpus` if given.
    pub fn start(dir: &Path, ferry: &Path, cpus: Option<&Cpus>) -> Result<Self> {
        util::step("starting a private sshd on 127.0.0.1 (own host key, user key and config)");
        if !Path::new(SSHD).is_file() {
            bail!("{SSHD} does not exist; `cargo xtask setup` installs openssh-server");
        }
        fs::create_dir(dir).with_context(|| format!("creating {} failed", dir.display()))?;
        // sshd's privilege separation dir. Other sshds on the machine use it
        // too, so it stays.
        fs::create_dir_all("/run/sshd").context("creating /run/sshd failed")?;
        let host_key = dir.join("host_key");
        let key = dir.join("user_key");
        for path in [&host_key, &key] {
            Cmd::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry-bench", "-f"])
                .arg(path)
                .run()?;
        }
        let authorized_keys = dir.join("authorized_keys");
        fs::copy(dir.join("user_key.pub"), &authorized_keys)
            .context("writing authorized_keys failed")?;
        // This build's ferry first on the sessions' PATH: ferry then runs it
        // as the agent rather than pushing a copy into root's home.
        let bin = dir.join("bin");
        fs::create_dir(&bin).with_context(|| format!("creating {} failed", bin.display()))?;
        symlink(ferry, bin.join("ferry")).context("linking ferry into the sshd's PATH failed")?;
        // The sessions' runtime directory, where ferry's kept agents listen:
        // inside ours, so they leave once it is removed.
        let run = dir.join("run");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&run)
            .with_context(|| format!("creating {} failed", run.display()))?;
        let host_pub = fs::read_to_string(dir.join("host_key.pub"))
            .context("reading the sshd's public host key failed")?;
        let host_pub: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        let known_hosts = dir.join("known_hosts");
        let config = dir.join("sshd_config");

        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let port = free_port()?;
            fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress {HOST}\n\
                     HostKey {host_key}\n\
                     AuthorizedKeysFile {authorized_keys}\n\
                     PidFile {pid_file}\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PermitRootLogin prohibit-password\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     Subsystem sftp internal-sftp\n\
                     SetEnv PATH={bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                     XDG_RUNTIME_DIR={run}\n\
                     LogLevel ERROR\n",
                    host_key = host_key.display(),
                    authorized_keys = authorized_keys.display(),
                    pid_file = dir.join("sshd.pid").display(),
                    bin = bin.display(),
                    run = run.display(),
                ),
            )
            .context("writing sshd_config failed")?;
            let log_path = dir.join("sshd.log");
            let log = File::create(&log_path).context("creating sshd.log failed")?;
            let args: [&OsString; 4] = [
                &"-D".into(),
                &"-e".into(),
                &"-f".into(),
                &config.clone().into_os_string(),
            ];
            match cpus {
                Some(cpus) => say!("$ taskset -c {cpus} {} &", Cmd::new(SSHD).args(args)),
                None => say!("$ {} &", Cmd::new(SSHD).args(args)),
            }
            let mut command = Command::new(SSHD);
            command
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            if let Some(cpus) = cpus.cloned() {
                // SAFETY: the closure only makes one system call, which is
                // safe between fork and exec.
                unsafe { command.pre_exec(move || cpus.pin_this_thread()) };
            }
            let child = command.spawn().context("could not start sshd")?;
            // From here on, dropping `sshd` stops it.
            let mut sshd = Self {
                child,
                port,
                key: key.clone(),
                known_hosts: known_hosts.clone(),
            };
            match sshd.wait_until_listening(&log_path) {
                Ok(()) => {
                    fs::write(
                        &known_hosts,
                        format!("[{HOST}]:{port} {} {}\n", host_pub[0], host_pub[1]),
                    )
                    .context("writing known_hosts failed")?;
                    say!("sshd is listening on {HOST}:{port}");
                    return Ok(sshd);
                }
                // Someone took the port between our probe and sshd's bind.
                Err(err) if attempt < ATTEMPTS && err.to_string().contains("in use") => {
                    util::warn(format_args!("{err:#}; trying another port"));
                }
                Err(err) => return Err(err),
            }
        }
        bail!("sshd did not start after {ATTEMPTS} attempts")
    }

    fn wait_until_listening(&mut self, log: &Path) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for sshd failed")? {
                let log = fs::read_to_string(log).unwrap_or_default();
                bail!("sshd exited at start ({status}): {}", util::one_line(&log));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if sys::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!("sshd is not listening on {addr} after 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ssh` with this sshd's port, user key and known_hosts and ferry's
    /// cipher, as one shell line (no user config, never a prompt).
    pub fn ssh_command(&self) -> String {
        let words = [
            "ssh".to_owned(),
            "-F".to_owned(),
            "/dev/null".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "-i".to_owned(),
            self.key.display().to_string(),
            // ferry's first choice too: baselines and ferry pay the same
            // for encryption (OpenSSH would pick chacha20-poly1305, slower
            // here).
            "-c".to_owned(),
            "aes128-gcm@openssh.com".to_owned(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
            "-o".to_owned(),
            "BatchMode=yes".to_owned(),
            "-o".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
        ];
        words
            .iter()
            .map(|word| shell_quote(word))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// [`Sshd::ssh_command`] sharing one connection, kept open, through the
    /// control socket `control`: as ferry does, so that a transfer timed
    /// with it does not pay for logging in.
    pub fn kept_ssh_command(&self, control: &Path) -> String {
        let words = [
            "-o".to_owned(),
            "ControlMaster=auto".to_owned(),
            "-o".to_owned(),
            format!("ControlPath={}", control.display()),
            "-o".to_owned(),
            "ControlPersist=600".to_owned(),
        ];
        let extra: Vec<String> = words.iter().map(|word| shell_quote(word)).collect();
        format!("{} {}", self.ssh_command(), extra.join(" "))
    }

    /// ferry's options for logging in to this sshd.
    pub fn ferry_args(&self) -> Vec<OsString> {
        vec![
            "--identity".into(),
            self.key.clone().into_os_string(),
            "--known-hosts".into(),
            self.known_hosts.clone().into_os_string(),
        ]
    }

    /// The listening sshd's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ssh:// URL of `path` on this sshd.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://root@{HOST}:{}{}", self.port, path.display())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The per-connection sshds first: ferry keeps its connection open
        // for the next job, and that ends only with its server side.
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status();
        sys::terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        say!("stopped sshd on {HOST}:{}", self.port);
    }
}

/// A port nobody listens on right now (the kernel's pick).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free port on 127.0.0.1 failed")?;
    Ok(listener
        .local_addr()
        .context("reading the port failed")?
        .port())
}
