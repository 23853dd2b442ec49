//! What the scenario's machine holds: the clusters, nodes, pods and ports, and lookups by name.

use std::net::Ipv4Addr;

/// A cluster of the scenario.
pub(super) struct ClusterDef {
    pub(super) name: &'static str,
    pub(super) id: u32,
    /// Underlay link number of its control plane.
    pub(super) cp_link: u8,
    /// ClusterIPs of payment-api (affinity local) and ledger (affinity none).
    pub(super) payment_vip: Ipv4Addr,
    pub(super) ledger_vip: Ipv4Addr,
}

pub(super) struct NodeDef {
    pub(super) name: &'static str,
    pub(super) cluster: &'static str,
    pub(super) link: u8,
    pub(super) pod_cidr: &'static str,
    /// Short tag for machine-wide names (WireGuard device).
    pub(super) tag: &'static str,
}

pub(super) struct PodDef {
    pub(super) name: &'static str,
    pub(super) node: &'static str,
    pub(super) ip: Ipv4Addr,
    pub(super) app: &'static str,
}

pub(super) const USA: &str = "cluster-usa";
pub(super) const EUROPE: &str = "cluster-europe";
pub(super) const MARS: &str = "cluster-mars";

pub(super) const CLUSTERS: [ClusterDef; 2] = [
    ClusterDef {
        name: USA,
        id: 1,
        cp_link: 10,
        payment_vip: Ipv4Addr::new(10, 101, 0, 10),
        ledger_vip: Ipv4Addr::new(10, 101, 0, 20),
    },
    ClusterDef {
        name: EUROPE,
        id: 2,
        cp_link: 20,
        payment_vip: Ipv4Addr::new(10, 102, 0, 10),
        ledger_vip: Ipv4Addr::new(10, 102, 0, 20),
    },
];

pub(super) const NODES: [NodeDef; 4] = [
    NodeDef {
        name: "usa-1",
        cluster: USA,
        link: 11,
        pod_cidr: "10.1.1.0/24",
        tag: "u1",
    },
    NodeDef {
        name: "usa-2",
        cluster: USA,
        link: 12,
        pod_cidr: "10.1.2.0/24",
        tag: "u2",
    },
    NodeDef {
        name: "europe-1",
        cluster: EUROPE,
        link: 21,
        pod_cidr: "10.2.1.0/24",
        tag: "e1",
    },
    NodeDef {
        name: "europe-2",
        cluster: EUROPE,
        link: 22,
        pod_cidr: "10.2.2.0/24",
        tag: "e2",
    },
];

pub(super) const PODS: [PodDef; 8] = [
    PodDef {
        name: "frontend",
        node: "usa-1",
        ip: Ipv4Addr::new(10, 1, 1, 5),
        app: "frontend",
    },
    PodDef {
        name: "pay-a",
        node: "usa-1",
        ip: Ipv4Addr::new(10, 1, 1, 10),
        app: "payment-api",
    },
    PodDef {
        name: "pay-b",
        node: "usa-2",
        ip: Ipv4Addr::new(10, 1, 2, 10),
        app: "payment-api",
    },
    PodDef {
        name: "reports",
        node: "usa-2",
        ip: Ipv4Addr::new(10, 1, 2, 5),
        app: "reports",
    },
    PodDef {
        name: "frontend-eu",
        node: "europe-1",
        ip: Ipv4Addr::new(10, 2, 1, 5),
        app: "frontend",
    },
    PodDef {
        name: "pay-c",
        node: "europe-1",
        ip: Ipv4Addr::new(10, 2, 1, 10),
        app: "payment-api",
    },
    PodDef {
        name: "pay-d",
        node: "europe-2",
        ip: Ipv4Addr::new(10, 2, 2, 10),
        app: "payment-api",
    },
    PodDef {
        name: "db",
        node: "europe-2",
        ip: Ipv4Addr::new(10, 2, 2, 5),
        app: "database",
    },
];

/// Ports the pods serve: payment-api and ledger answer with the pod's address (what
/// `sockprobe` prints), echo keeps long-lived connections, the database answers like payment.
pub(super) const PAYMENT_PORT: u16 = 8080;
pub(super) const LEDGER_PORT: u16 = 9090;
pub(super) const ECHO_PORT: u16 = 7000;
pub(super) const DB_PORT: u16 = 5432;

/// The third cluster of step 7: its pod CIDR overlaps usa's.
pub(super) const MARS_ID: u32 = 3;
pub(super) const MARS_CP_LINK: u8 = 30;
pub(super) const MARS_NODE_LINK: u8 = 31;
/// mars reused usa's 10.1.0.0/16 cluster pool: its first node got a /24 usa-1 has too.
pub(super) const MARS_POD_CIDR: &str = "10.1.1.0/24";

pub(super) fn cluster(name: &str) -> &'static ClusterDef {
    CLUSTERS
        .iter()
        .find(|c| c.name == name)
        .expect("known cluster")
}
pub(super) fn node_def(name: &str) -> &'static NodeDef {
    NODES.iter().find(|n| n.name == name).expect("known node")
}
pub(super) fn pod_def(name: &str) -> &'static PodDef {
    PODS.iter().find(|p| p.name == name).expect("known pod")
}
pub(super) fn pod_cluster(pod: &PodDef) -> &'static str {
    node_def(pod.node).cluster
}
pub(super) fn nodes_of(cluster: &str) -> impl Iterator<Item = &'static NodeDef> {
    NODES.iter().filter(move |n| n.cluster == cluster)
}
pub(super) fn underlay_ip(link: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, link, 2)
}
pub(super) fn short(cluster: &str) -> &str {
    cluster.trim_start_matches("cluster-")
}

/// Which cluster a backend address belongs to.
pub(super) fn backend_cluster(answer: &str) -> &'static str {
    if answer.starts_with("10.1.") {
        USA
    } else if answer.starts_with("10.2.") {
        EUROPE
    } else {
        "?"
    }
}
