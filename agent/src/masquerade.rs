//! Egress masquerade: traffic from this node's pods to anything outside every mesh pod CIDR
//! (every node's, in every cluster) and outside the configured `nonMasqueradeCIDRs` leaves
//! with the node's address as its source, so replies from the node network and the internet
//! come back. Pod-to-pod traffic, within and across clusters, keeps its source (identities
//! stay intact). Owner of the nftables table `ip strait_nat`, replaced atomically with
//! `nft -f -` whenever the mesh's pod CIDRs change; nothing else writes it.

use std::{collections::HashSet, net::Ipv4Addr, process::Stdio, time::Duration};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::{constants, state::StateHandle};

/// How long a failed apply waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// `masquerade:` — SNAT of pod egress to the node address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MasqueradeSection {
    /// Off by default: the node's CNI (strait-cni) turns it on where strait is the only CNI.
    #[serde(default)]
    pub enabled: bool,
    /// Destinations never masqueraded besides the mesh's pod CIDRs (the node network, say).
    #[serde(default, rename = "nonMasqueradeCIDRs")]
    pub non_masquerade_cidrs: Vec<Ipv4Net>,
}

#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    #[error("cannot run {nft}: {source}")]
    Spawn {
        nft: &'static str,
        source: std::io::Error,
    },
    #[error("{nft} refused the ruleset: {stderr}")]
    Refused { nft: &'static str, stderr: String },
}

/// What the rules are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqueradePlan {
    /// The address pod egress is SNATed to.
    pub node_ip: Ipv4Addr,
    /// Sources: this node's pod CIDRs.
    pub local_pods: Vec<Ipv4Net>,
    /// Destinations left alone: every mesh pod CIDR, the configured ones, multicast.
    pub exempt: Vec<Ipv4Net>,
}

impl MasqueradePlan {
    /// From this node's pod CIDRs, the configured exemptions and the mesh's pod CIDRs;
    /// prefixes are merged (nftables refuses overlapping interval elements).
    pub fn new(
        node_ip: Ipv4Addr,
        local_pods: &[Ipv4Net],
        non_masquerade: &[Ipv4Net],
        mesh_pod_cidrs: impl IntoIterator<Item = Ipv4Net>,
    ) -> Self {
        let multicast: Ipv4Net = "224.0.0.0/4".parse().expect("valid prefix");
        let mut exempt: Vec<Ipv4Net> = mesh_pod_cidrs
            .into_iter()
            .chain(local_pods.iter().copied())
            .chain(non_masquerade.iter().copied())
            .chain([multicast])
            .collect();
        exempt = Ipv4Net::aggregate(&exempt);
        Self {
            node_ip,
            local_pods: Ipv4Net::aggregate(&local_pods.to_vec()),
            exempt,
        }
    }

    /// The nft script: creates the table if absent, deletes it, and defines it anew, in
    /// one transaction.
    pub fn ruleset(&self) -> String {
        let elements = |nets: &[Ipv4Net]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let table = constants::MASQUERADE_NFT_TABLE;
        let mut s = format!("table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n");
        s.push_str("\tset pods {\n\t\ttype ipv4_addr; flags interval;\n");
        if !self.local_pods.is_empty() {
            s.push_str(&format!(
                "\t\telements = {{ {} }}\n",
                elements(&self.local_pods)
            ));
        }
        s.push_str("\t}\n\tset exempt {\n\t\ttype ipv4_addr; flags interval;\n");
        s.push_str(&format!(
            "\t\telements = {{ {} }}\n",
            elements(&self.exempt)
        ));
        s.push_str("\t}\n\tchain postrouting {\n");
        s.push_str("\t\ttype nat hook postrouting priority srcnat; policy accept;\n");
        s.push_str(&format!(
            "\t\tip saddr @pods ip daddr != @exempt counter snat to {}\n",
            self.node_ip
        ));
        s.push_str("\t}\n}\n");
        s
    }
}

/// Applies a ruleset with `nft -f -`.
async fn apply(ruleset: &str) -> Result<(), MasqueradeError> {
    let nft = constants::NFT_BIN;
    let spawn_err = |source| MasqueradeError::Spawn { nft, source };
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(ruleset.as_bytes())
        .await
        .map_err(spawn_err)?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MasqueradeError::Refused {
            nft,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Every IPv4 pod CIDR of every node the model knows, in every cluster.
fn mesh_pod_cidrs(state: &StateHandle) -> Vec<Ipv4Net> {
    state
        .read()
        .nodes()
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .filter_map(|c| match c {
            IpNet::V4(v4) => Some(v4.trunc()),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// Keeps the table equal to the plan for the model's current pod CIDRs. Runs until dropped.
pub async fn reconcile(
    node_ip: Ipv4Addr,
    local_pods: Vec<Ipv4Net>,
    section: MasqueradeSection,
    state: StateHandle,
) {
    let mut versions = state.subscribe();
    let mut applied: Option<MasqueradePlan> = None;
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let seen = versions.borrow_and_update().nodes;
        let plan = MasqueradePlan::new(
            node_ip,
            &local_pods,
            &section.non_masquerade_cidrs,
            mesh_pod_cidrs(&state),
        );
        let mut failed = false;
        if applied.as_ref() != Some(&plan) {
            match apply(&plan.ruleset()).await {
                Ok(()) => {
                    tracing::info!(
                        snat_to = %node_ip,
                        exempt = plan.exempt.len(),
                        "masquerade rules applied"
                    );
                    applied = Some(plan);
                }
                Err(e) => {
                    if reported.insert(e.to_string()) {
                        tracing::error!(error = %e, "cannot apply the masquerade rules; will retry");
                    }
                    failed = true;
                }
            }
        }
        tokio::select! {
            r = versions.wait_for(|v| v.nodes != seen) => if r.is_err() { return },
            _ = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<Ipv4Net> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn exempts_every_mesh_pod_cidr_and_the_configured_ones_merged() {
        let plan = MasqueradePlan::new(
            "192.168.1.10".parse().unwrap(),
            &nets(&["10.1.1.0/24"]),
            &nets(&["192.168.0.0/16", "192.168.1.0/24"]),
            // This cluster's other node and a remote cluster's node.
            nets(&["10.1.1.0/24", "10.1.2.0/24", "10.2.7.0/24"]),
        );
        assert_eq!(plan.local_pods, nets(&["10.1.1.0/24"]));
        assert_eq!(
            plan.exempt,
            nets(&[
                "10.1.1.0/24",
                "10.1.2.0/24",
                "10.2.7.0/24",
                "192.168.0.0/16",
                "224.0.0.0/4"
            ])
        );
        let rules = plan.ruleset();
        assert!(
            rules.contains("ip saddr @pods ip daddr != @exempt counter snat to 192.168.1.10"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "elements = { 10.1.1.0/24, 10.1.2.0/24, 10.2.7.0/24, 192.168.0.0/16, 224.0.0.0/4 }"
            ),
            "{rules}"
        );
        // Replaced whole: created if missing, deleted, defined.
        assert!(rules.starts_with("table ip strait_nat\ndelete table ip strait_nat\n"));
    }

    #[test]
    fn no_local_pod_cidr_gives_an_empty_source_set() {
        let plan = MasqueradePlan::new("192.168.1.10".parse().unwrap(), &[], &[], []);
        let rules = plan.ruleset();
        assert!(!rules.contains("elements = {  }"), "{rules}");
        assert!(
            rules.contains("set pods {\n\t\ttype ipv4_addr; flags interval;\n\t}"),
            "{rules}"
        );
    }
}
