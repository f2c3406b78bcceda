//! CPU time a transfer costs at each end, read from procfs and `getrusage`.
//! On a shared machine wall-clock times wander with other work; CPU seconds
//! per GiB wander far less, and say where the time goes.
//!
//! - source side: the children this process waited for during the run
//!   (ferry and its `ssh`, or a baseline's shell, `ssh` and `dd`), plus
//!   the background `ssh` connections ferry and the baselines keep open
//!   (which do the encrypting for their jobs), found by their control
//!   sockets' paths;
//! - target side: the private sshd and all of its descendants (one sshd
//!   per connection, and the agent, `cat` or `dd` it runs): live ones by
//!   their own time, finished ones through their parents' `cutime` and
//!   `cstime`; plus ferry's kept agents for the bench's root, which run
//!   in sessions of their own, found by their command lines;
//! - machine: every CPU's busy time, which also holds kernel threads (the
//!   loop device's reads) and whatever else the machine runs.

use std::{collections::HashMap, fs, ops::Sub, path::Path};

use anyhow::{Context, Result};

/// CPU seconds spent, by side.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    pub source: f64,
    pub target: f64,
    pub machine: f64,
}

impl Sub for Spent {
    type Output = Spent;

    fn sub(self, earlier: Spent) -> Spent {
        Spent {
            source: self.source - earlier.source,
            target: self.target - earlier.target,
            machine: self.machine - earlier.machine,
        }
    }
}

/// Measures what runs between two readings.
pub struct Meter {
    /// The private sshd's listener.
    sshd: u32,
    /// In the command line of a kept `ssh` connection, ferry's or a
    /// baseline's (which shows its control socket's path, `ssh: PATH
    /// [mux]`).
    controls: Vec<String>,
    /// In the command line of a kept agent serving the bench's root.
    agents: Option<String>,
}

/// One reading: the totals so far, and the kept connections' and kept
/// agents' own times (by pid: one may end or start between readings).
struct Reading {
    spent: Spent,
    masters: HashMap<u32, f64>,
    agents: HashMap<u32, f64>,
}

impl Meter {
    pub fn new(sshd: u32, state_dir: &Path) -> Self {
        Self {
            sshd,
            controls: vec![format!("{}/", state_dir.join("ssh").display())],
            agents: None,
        }
    }

    /// Also counts on the target side the kept agents serving `root`.
    pub fn with_kept_agents(mut self, root: &Path) -> Self {
        self.agents = Some(format!(" agent --root {} --listen ", root.display()));
        self
    }

    /// Also counts on the source side the kept connections whose control
    /// sockets are in `dir`.
    pub fn with_control_dir(mut self, dir: &Path) -> Self {
        self.controls.push(format!("{}/", dir.display()));
        self
    }

    /// Runs `f` and returns what it returned and the CPU time it cost.
    pub fn measure<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, Spent)> {
        let before = self.read()?;
        let out = f()?;
        let after = self.read()?;
        let mut spent = after.spent - before.spent;
        spent.source += grown(&before.masters, &after.masters);
        spent.target += grown(&before.agents, &after.agents);
        Ok((out, spent))
    }

    fn read(&self) -> Result<Reading> {
        let tick = clock_tick();
        let procs = processes()?;
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, p) in &procs {
            children.entry(p.ppid).or_default().push(*pid);
        }
        let mut target = 0u64;
        let mut todo = vec![self.sshd];
        while let Some(pid) = todo.pop() {
            if let Some(p) = procs.get(&pid) {
                target += p.own + p.waited;
            }
            todo.extend(children.get(&pid).into_iter().flatten());
        }
        // Own times of the processes named `comm` whose command lines hold
        // one of `marks`.
        let own_times = |comm: &str, marks: &[String]| -> HashMap<u32, f64> {
            procs
                .iter()
                .filter(|(pid, p)| {
                    p.comm == comm && {
                        let line = cmdline(**pid);
                        marks.iter().any(|m| line.contains(m.as_str()))
                    }
                })
                .map(|(pid, p)| (*pid, p.own as f64 / tick))
                .collect()
        };
        let masters = own_times("ssh", &self.controls);
        let agents = own_times("ferry", self.agents.as_slice());
        Ok(Reading {
            spent: Spent {
                source: waited_children_secs(),
                target: target as f64 / tick,
                machine: machine_busy_ticks()? as f64 / tick,
            },
            masters,
            agents,
        })
    }
}

/// Seconds the processes in `after` spent since `before` (one that started
/// in between counts from zero).
fn grown(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, secs)| secs - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

/// What /proc/PID/stat says of a process, in clock ticks.
#[derive(Debug, PartialEq)]
struct Proc {
    comm: String,
    ppid: u32,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: its children that ended and were waited for.
    waited: u64,
}

/// Parses /proc/PID/stat (the name, in parentheses, may hold spaces).
fn parse_stat(stat: &str) -> Option<Proc> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // Fields after the name, counting from 3 (state) as in proc(5).
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(Proc {
        comm,
        ppid: u32::try_from(field(4)?).ok()?,
        own: field(14)? + field(15)?,
        waited: field(16)? + field(17)?,
    })
}

/// Every process readable now (those that end while being read are left
/// out).
fn processes() -> Result<HashMap<u32, Proc>> {
    let mut procs = HashMap::new();
    for entry in fs::read_dir("/proc").context("reading /proc failed")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(p) = parse_stat(&stat) {
            procs.insert(pid, p);
        }
    }
    Ok(procs)
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Busy ticks of all CPUs from the first line of /proc/stat.
fn machine_busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat failed")?;
    busy_ticks(&stat).context("/proc/stat has no cpu line")
}

fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Some(
        [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| ticks.get(i))
            .sum(),
    )
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU seconds of every child this process has waited for, so far.
fn waited_children_secs() -> f64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given and keeps no
    // pointer to it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let stat = "4242 (sshd: root@notty) S 17 4242 4242 0 -1 4194560 900 0 0 0 \
                    123 45 6 7 20 0 1 0 100 1000 200";
        assert_eq!(
            parse_stat(stat),
            Some(Proc {
                comm: "sshd: root@notty".into(),
                ppid: 17,
                own: 168,
                waited: 13,
            })
        );
        assert_eq!(parse_stat("12 (x) S"), None);
    }

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 70 4 6 8 0 0\ncpu0 50 1 15 2500 35 2 3 4 0 0\n";
        assert_eq!(busy_ticks(stat), Some(150));
        assert_eq!(busy_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn the_process_tree_and_children_are_read() {
        let meter = Meter::new(std::process::id(), Path::new("/nonexistent-state"));
        let (_, spent) = meter
            .measure(|| {
                // A child that burns a little CPU and is waited for.
                let st = std::process::Command::new("sh")
                    .args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
                    .status()?;
                anyhow::ensure!(st.success());
                Ok(())
            })
            .unwrap();
        assert!(spent.source > 0.0, "{spent:?}");
        assert!(spent.machine >= 0.0, "{spent:?}");
    }
}
