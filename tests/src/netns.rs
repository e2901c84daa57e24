//! The lab of `deploy/lab/netns.sh`: "hosts" as network namespaces on one bridge, so that the
//! coordinator and workers talk over real addresses and the tests can cut a host off, or only
//! the collective traffic between two hosts, with iptables inside a namespace. Needs root,
//! iproute2 and iptables: [`Net::new`] says why when they are missing, and the tests skip.

use std::process::Command;

/// `deploy/lab/netns.sh ARGS`; an error carries what it printed.
pub fn lab(args: &[&str]) -> Result<(), String> {
    let out = Command::new(crate::repo_root().join("deploy/lab/netns.sh"))
        .args(args)
        .output()
        .map_err(|e| format!("deploy/lab/netns.sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`deploy/lab/netns.sh {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A bridge with `hosts` network namespaces on it, removed on drop.
pub struct Net {
    tag: String,
    pub namespaces: Vec<String>,
    /// The first three octets of the subnet.
    subnet: String,
}

impl Net {
    /// Tagged with this process's id, so that test binaries running at once do not collide.
    pub fn new(hosts: usize) -> Result<Net, String> {
        let tag = std::process::id() % 10_000;
        let net = Net {
            tag: tag.to_string(),
            namespaces: (0..hosts).map(|i| format!("dapt{tag}h{i}")).collect(),
            subnet: format!("10.213.{}", tag % 250),
        };
        lab(&["up", &net.tag, &hosts.to_string()])?;
        Ok(net)
    }

    /// The bridge's address in the root namespace (where the coordinator listens).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    pub fn host(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    /// Drops every packet in and out of host `i`.
    pub fn cut(&self, i: usize) {
        lab(&["cut", &self.tag, &i.to_string()]).expect("cut");
    }

    /// Drops the TCP traffic between hosts `i` and `j` to or from `port` (a collective's
    /// listen port), in host `i`'s namespace: everything else, the coordinator's sessions
    /// included, still flows.
    pub fn cut_link(&self, i: usize, j: usize, port: u16) {
        lab(&[
            "cut-link",
            &self.tag,
            &i.to_string(),
            &self.host(j),
            &port.to_string(),
        ])
        .expect("cut-link");
    }

    /// `dapt-worker` run inside host `i`'s namespace, its ring listening on `port` of the host's
    /// address (0: any free port); [`crate::Cluster::member_from`] adds the rest.
    pub fn worker_command(&self, i: usize, port: u16) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespaces[i]])
            .arg(crate::binary("dapt-worker"))
            .args(["--listen", &format!("{}:{port}", self.host(i))]);
        cmd
    }

    /// The lab of `hosts` hosts, or `None` after printing why it cannot be made here (not root,
    /// no `ip` or `iptables`): the calling test then skips.
    pub fn or_skip(hosts: usize) -> Option<Net> {
        Net::new(hosts)
            .map_err(|why| println!("SKIPPED: network namespaces cannot be made here: {why}"))
            .ok()
    }

    /// Removes host `i`'s rules.
    pub fn heal(&self, i: usize) {
        lab(&["heal", &self.tag, &i.to_string()]).expect("heal");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = lab(&["down", &self.tag]);
    }
}
