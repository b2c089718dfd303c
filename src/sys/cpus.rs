//! CPU lists (`0,2-3`, as `taskset -c` and `/sys/devices/system/cpu/online` write them) and
//! the calling thread's CPU affinity.

use std::fmt;
use std::io;

/// A non-empty, sorted set of CPU numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

/// The largest CPU number a `cpu_set_t` holds.
const MAX_CPU: usize = libc::CPU_SETSIZE as usize - 1;

impl CpuList {
    /// Parses `0,2-3`: CPU numbers and inclusive ranges, comma-separated.
    pub fn parse(s: &str) -> Result<CpuList, String> {
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim) {
            let num = |t: &str| {
                t.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c <= MAX_CPU)
                    .ok_or_else(|| {
                        format!(
                            "`{t}` in `{s}` is not a CPU number (0-{MAX_CPU}); write e.g. 0,2-3"
                        )
                    })
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!(
                            "`{part}` in `{s}` is an empty range; write {b}-{a}"
                        ));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }

    /// The CPUs online (`/sys/devices/system/cpu/online`). A thread may be pinned to any of
    /// them, also outside the affinity `taskset` gave the process (within its cgroup).
    pub fn online() -> io::Result<CpuList> {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        CpuList::parse(text.trim()).map_err(io::Error::other)
    }

    /// The CPUs the calling thread may run on (its affinity, e.g. as `taskset` left it).
    pub fn allowed() -> io::Result<CpuList> {
        // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it for this thread.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error());
            }
            set
        };
        // SAFETY: CPU_ISSET reads the set; every index is below CPU_SETSIZE.
        Ok(CpuList(
            (0..=MAX_CPU)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect(),
        ))
    }

    /// The CPUs of this list that are not in `allowed`: a list naming CPUs that are not
    /// online would leave a thread pinned to fewer CPUs than the operator meant, or none.
    pub fn outside(&self, allowed: &CpuList) -> Vec<usize> {
        self.0
            .iter()
            .copied()
            .filter(|c| !allowed.0.contains(c))
            .collect()
    }

    /// Pins the calling thread to these CPUs.
    pub fn pin_current_thread(&self) -> io::Result<()> {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET is given numbers below CPU_SETSIZE
        // (parse checks); sched_setaffinity(0) changes only the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &self.0 {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl fmt::Display for CpuList {
    /// Writes the list back in its shortest form: `0,2-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if i > 0 {
                f.write_str(",")?;
            }
            if j > i {
                write!(f, "{}-{}", self.0[i], self.0[j])?;
            } else {
                write!(f, "{}", self.0[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_back_in_short_form() {
        for (input, shown) in [
            ("0", "0"),
            ("1,0", "0-1"),
            ("0,2-3", "0,2-3"),
            (" 3-5 , 1,4", "1,3-5"),
            ("7-7", "7"),
        ] {
            assert_eq!(CpuList::parse(input).unwrap().to_string(), shown, "{input}");
        }
        for bad in ["", "a", "1,", "3-1", "-1", "0-", "99999"] {
            let err = CpuList::parse(bad).expect_err(bad);
            assert!(err.contains(bad) || bad.is_empty(), "{bad}: {err}");
        }
    }

    #[test]
    fn a_thread_pins_itself_to_an_allowed_cpu() {
        std::thread::spawn(|| {
            let allowed = CpuList::allowed().unwrap();
            let first = CpuList(vec![allowed.0[0]]);
            assert!(first.outside(&allowed).is_empty());
            first.pin_current_thread().unwrap();
            assert_eq!(CpuList::allowed().unwrap(), first);
            let beyond = CpuList(vec![MAX_CPU]);
            assert_eq!(beyond.outside(&allowed), vec![MAX_CPU]);
            // What a thread may run on is online.
            assert!(allowed.outside(&CpuList::online().unwrap()).is_empty());
        })
        .join()
        .unwrap();
    }
}
