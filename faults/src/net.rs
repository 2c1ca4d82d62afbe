//! The run's network: each process in a network namespace of its own,
//! joined by a bridge in one more namespace (the switch), so that a
//! partition between any two is a pair of blackhole routes and healing it
//! is their removal; nothing touches the host's own network. Made with
//! `ip` (iproute2), as root; removed when dropped.
//!
//! Member `i` has the address `<subnet>.<i + 1>` on its `eth0` (the
//! subnet `10.77.0` unless told); a process run with [`Net::command`]
//! listens and connects there. With a host link, the harness's own
//! process reaches the members too, from `<subnet>.254`.

use std::process::Command;

use anyhow::{bail, Context};

/// The members' subnet unless told.
const SUBNET: &str = "10.77.0";

/// A switch and its members' namespaces.
#[derive(Debug)]
pub struct Net {
    /// Namespace names start with it (unique per run).
    prefix: String,
    members: usize,
    subnet: String,
    /// The host's end of its link to the switch, if it has one.
    host: Option<String>,
}

/// Runs `ip ARGS`, failing with what it said.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// `members` namespaces named `<prefix><i>` on a switch `<prefix>sw`.
    pub fn new(prefix: &str, members: usize) -> anyhow::Result<Self> {
        Self::with_subnet(prefix, members, SUBNET, false)
    }

    /// [`Net::new`] on `subnet` (`10.78.0`); with `host`, the harness's
    /// process joins the switch as `<subnet>.254` (the subnet must then be
    /// unused on this host).
    pub fn with_subnet(
        prefix: &str,
        members: usize,
        subnet: &str,
        host: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(members < 250, "at most 249 members");
        anyhow::ensure!(prefix.len() <= 12, "a prefix of at most 12 characters");
        let net = Self {
            prefix: prefix.to_owned(),
            members: 0,
            subnet: subnet.to_owned(),
            host: None,
        };
        let sw = net.switch();
        ip(&["netns", "add", &sw])?;
        let mut net = net;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..members {
            let ns = net.ns(i);
            ip(&["netns", "add", &ns])?;
            net.members = i + 1;
            let (inner, outer) = ("eth0", format!("p{i}"));
            ip(&[
                "-n", &ns, "link", "add", inner, "type", "veth", "peer", "name", &outer, "netns",
                &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                inner,
            ])?;
            ip(&["-n", &ns, "link", "set", inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        if host {
            let end = format!("{prefix}h");
            ip(&[
                "link", "add", &end, "type", "veth", "peer", "name", "ph", "netns", &sw,
            ])?;
            net.host = Some(end.clone());
            ip(&["-n", &sw, "link", "set", "ph", "master", "br0", "up"])?;
            ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &end])?;
            ip(&["link", "set", &end, "up"])?;
        }
        Ok(net)
    }

    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Member `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// Member `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// `program` to run in member `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), program]);
        c
    }

    /// Cuts `a` and `b` off from each other, both ways.
    pub fn partition(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.blackholes("add", a, b)
    }

    /// Joins `a` and `b` again.
    pub fn heal(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.blackholes("del", a, b)
    }

    /// `ip route <op> blackhole` for each of `a` and `b` towards the other.
    fn blackholes(&self, op: &str, a: usize, b: usize) -> anyhow::Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &self.ns(from),
                "route",
                op,
                "blackhole",
                &self.addr(to),
            ])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(end) = &self.host {
            let _ = ip(&["link", "delete", end]);
        }
        // Deleting a namespace deletes its ends of the links.
        for i in 0..self.members {
            let _ = ip(&["netns", "delete", &self.ns(i)]);
        }
        let _ = ip(&["netns", "delete", &self.switch()]);
    }
}
