//! Two hosts on one machine. The bench's source side (ferry and its `ssh`,
//! or a baseline's shell, `ssh`, `dd` and `rsync`) and its target side (the
//! sshd and all it starts: agents, `cat`, `dd`, `rsync`) would each have a
//! host's CPUs to themselves in use. Here they share one machine, so each
//! side is pinned to half of its CPUs, the same way for ferry and for every
//! baseline. Unpinned, the scheduler puts the two ends' busiest processes
//! on one CPU at a time and a job with more processes per side loses more
//! to that than a plain pipe does.

use anyhow::Result;

use crate::sys::Cpus;

/// The CPUs of each side.
pub struct Hosts {
    pub source: Cpus,
    pub target: Cpus,
}

impl Hosts {
    /// Splits the CPUs this process may use into two halves, the first for
    /// the source; `None` with fewer than two.
    pub fn split() -> Result<Option<Self>> {
        Ok(
            halves(&Cpus::allowed()?.list()).map(|(source, target)| Self {
                source: Cpus::of(&source),
                target: Cpus::of(&target),
            }),
        )
    }
}

/// The first half of `cpus` and the rest; `None` with fewer than two. An
/// odd CPU goes to the target, which also writes the image.
fn halves(cpus: &[usize]) -> Option<(Vec<usize>, Vec<usize>)> {
    if cpus.len() < 2 {
        return None;
    }
    let (source, target) = cpus.split_at(cpus.len() / 2);
    Some((source.to_vec(), target.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_split_in_halves_with_an_odd_one_to_the_target() {
        assert_eq!(halves(&[0, 1]), Some((vec![0], vec![1])));
        assert_eq!(halves(&[0, 2, 5]), Some((vec![0], vec![2, 5])));
        assert_eq!(halves(&[0, 1, 2, 3]), Some((vec![0, 1], vec![2, 3])));
        assert_eq!(halves(&[3]), None);
        assert_eq!(halves(&[]), None);
    }

    #[test]
    fn pinning_this_thread_shows_in_its_allowed_cpus() {
        let allowed = Cpus::allowed().unwrap();
        let first = allowed.list()[0];
        // A thread of its own, so the test harness's others keep theirs.
        std::thread::spawn(move || {
            Cpus::of(&[first]).pin_this_thread().unwrap();
            assert_eq!(Cpus::allowed().unwrap().list(), [first]);
        })
        .join()
        .unwrap();
    }
}
