//! One process of a run (an etcd member, a NATS server, a fleetgate node)
//! in its namespace of the run's network, started again on the same
//! command after a kill, paused and woken; its output appended to a log
//! file, so a restart's lines follow the crash's.
//!
//! `ip netns exec` execs the program in its own place, so the child's pid
//! is the program's: kill -9 and SIGSTOP reach it and nothing between.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::net::Net;

/// A restartable process.
#[derive(Debug)]
pub struct Proc {
    /// `etcd-0`, `nats-1`, `node-2`: how faults and silences name it.
    pub name: String,
    /// Its member of the run's network.
    pub member: usize,
    program: String,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// Sends `signal` (`-STOP`, `-CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Proc {
    /// Starts `program args` with `envs` in `member`'s namespace, its
    /// output appended to `log`.
    pub fn start(
        net: &Net,
        member: usize,
        name: &str,
        program: &str,
        args: Vec<OsString>,
        envs: Vec<(String, String)>,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            name: name.to_owned(),
            member,
            program: program.to_owned(),
            args,
            envs,
            log,
            child: None,
            paused: false,
        };
        p.spawn(net)?;
        Ok(p)
    }

    fn spawn(&mut self, net: &Net) -> anyhow::Result<()> {
        if let Some(d) = self.log.parent() {
            std::fs::create_dir_all(d)?;
        }
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("{}'s log {}", self.name, self.log.display()))
        };
        let child = net
            .command(self.member, &self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// kill -9, and waits for it (a paused process is killed too).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// Starts it again on the same command (after [`Proc::kill`], or after
    /// it died).
    pub fn restart(&mut self, net: &Net) -> anyhow::Result<()> {
        self.kill();
        self.spawn(net)
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-STOP");
            self.paused = true;
        }
    }

    /// SIGCONT.
    pub fn wake(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "-CONT");
        }
        self.paused = false;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs (not killed, not exited); a paused one runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The log's last `n` lines.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
