//! The agent config's `datapath:` section, defined by the component it configures.

use std::path::PathBuf;

use serde::Deserialize;

use super::MapSizes;
use crate::constants;

/// The eBPF datapath.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatapathSection {
    /// bpffs directory under which the versioned pin directory (`strait-v<N>`) lives.
    #[serde(default = "default_pin_root")]
    pub pin_root: PathBuf,
    /// cgroup v2 directory whose processes get the socket load balancer (every pod of the
    /// node: the cgroup v2 root on a real node). Default: the cgroup v2 mount point.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Also report allowed new flows to `strait observe` (drops are always reported).
    #[serde(default)]
    pub trace_allowed: bool,
    #[serde(default)]
    pub map_sizes: MapSizes,
}

fn default_pin_root() -> PathBuf {
    constants::BPFFS_ROOT.into()
}
