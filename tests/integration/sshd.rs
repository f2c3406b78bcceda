//! A real OpenSSH server on 127.0.0.1 for tests: its own host key, user key,
//! authorized_keys, known_hosts and config in a private directory, on a
//! free port. Stopped and removed in `Drop`.

use std::{
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::unique;

pub struct Sshd {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
}

impl Sshd {
    pub fn start() -> Self {
        Self::start_with_key_options("")
    }

    /// An sshd whose authorized_keys line for the test key carries
    /// `options` (such as `command="..."`, which wraps every session).
    pub fn start_with_key_options(options: &str) -> Self {
        let dir = PathBuf::from("/dev/shm").join(unique("ferry-sshd"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        for key in ["host_key", "id_ed25519"] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry-test", "-f"])
                .arg(dir.join(key))
                .status()
                .expect("ssh-keygen (openssh-client) is installed by cargo xtask setup");
            assert!(st.success(), "ssh-keygen failed");
        }
        let key = std::fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
        let line = if options.is_empty() {
            key
        } else {
            format!("{options} {key}")
        };
        std::fs::write(dir.join("authorized_keys"), line).unwrap();
        // The sessions' runtime directory, where kept agents listen: ours,
        // so they go (their sockets gone) when this sshd is dropped.
        let run = dir.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        for attempt in 0.. {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nUsePAM no\n\
                 StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n\
                 SetEnv XDG_RUNTIME_DIR={d}/run\n",
                d = dir.display()
            );
            std::fs::write(dir.join("sshd_config"), config).unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(dir.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sshd (openssh-server) is installed by cargo xtask setup");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
                    let mut parts = host_pub.split_whitespace();
                    let line = format!(
                        "[127.0.0.1]:{port} {} {}\n",
                        parts.next().unwrap(),
                        parts.next().unwrap()
                    );
                    std::fs::write(dir.join("known_hosts"), line).unwrap();
                    return Self { dir, port, child };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port to someone else: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(attempt < 3, "sshd did not start");
        }
        unreachable!()
    }

    /// `ssh://root@127.0.0.1:PORT/PATH`.
    pub fn url(&self, path: &std::path::Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, path.display())
    }

    /// The options ferry needs to log in and check the host key.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--identity".into(),
            self.dir.join("id_ed25519").display().to_string(),
            "--known-hosts".into(),
            self.dir.join("known_hosts").display().to_string(),
        ]
    }

    /// The per-connection sshd processes (one per open connection), once
    /// their number has settled at what `settled` accepts (a closed
    /// connection's process takes a moment to exit); after 5 s, whatever
    /// there is.
    pub fn connections(&self, settled: impl Fn(usize) -> bool) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = Command::new("pgrep")
                .args(["-P", &self.child.id().to_string()])
                .output()
                .expect("pgrep (procps) is installed");
            let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if settled(pids.len()) || Instant::now() > deadline {
                return pids;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sockets of the agents kept in this sshd's sessions.
    pub fn kept_agents(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("run/ferry")) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect()
    }

    /// Kills the per-connection sshd processes (cuts every session) but not
    /// the listener.
    pub fn kill_sessions(&self) -> bool {
        Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-P", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
