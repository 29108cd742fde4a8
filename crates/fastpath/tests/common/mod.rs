//! The privileged NFQUEUE tests' namespace: a fresh, anonymous network namespace per test
//! thread (`unshare`), with the commands and iptables rules the tests need in it. Nothing
//! touches the root namespace; the kernel frees the namespace with the test's threads.

#![allow(dead_code)] // each test file uses part of it

use std::io;
use std::path::PathBuf;
use std::process::Command;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn skip_unless_root(name: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("NOTICE: {name}: not root, skipping this privileged NFQUEUE test");
    true
}

pub fn netns_of_thread() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("readlink /proc/thread-self/ns/net")
}

/// A fresh network namespace for the current thread; see the module docs.
pub struct TestNetns {
    root: PathBuf,
    pub own: PathBuf,
    tables: Vec<&'static str>,
}

impl TestNetns {
    pub fn enter() -> TestNetns {
        let root = netns_of_thread();
        // SAFETY: unshare only changes the calling thread's namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
        let own = netns_of_thread();
        assert_ne!(own, root, "still in the original network namespace");
        let ns = TestNetns { root, own, tables: Vec::new() };
        ns.run("ip", &["link", "set", "lo", "up"]);
        ns
    }

    pub fn check(&self) {
        let now = netns_of_thread();
        assert!(now == self.own && now != self.root, "not in the test namespace: {now:?}");
    }

    pub fn run(&self, cmd: &str, args: &[&str]) -> String {
        self.check();
        let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn iptables(&mut self, table: &'static str, rule: &str) {
        if !self.tables.contains(&table) {
            self.tables.push(table);
        }
        let mut args = vec!["-w", "-t", table];
        args.extend(rule.split_whitespace());
        self.run("iptables", &args);
    }

    /// Packet counter of the first rule of `chain` whose listing contains `needle` (and
    /// not `unless`, when given).
    pub fn counter(&self, table: &str, chain: &str, needle: &str, unless: Option<&str>) -> u64 {
        let out = self.run("iptables", &["-w", "-t", table, "-L", chain, "-v", "-n", "-x"]);
        out.lines()
            .filter(|l| l.contains(needle) && unless.is_none_or(|u| !l.contains(u)))
            .find_map(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no rule with {needle:?} in {table}/{chain}:\n{out}"))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if netns_of_thread() != self.own {
            return;
        }
        for t in &self.tables {
            let _ = Command::new("iptables").args(["-w", "-t", t, "-F"]).output();
        }
    }
}

/// Run `f` on a new thread inside a new network namespace; propagate its panic.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce(&mut TestNetns) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let mut ns = TestNetns::enter();
        f(&mut ns)
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
