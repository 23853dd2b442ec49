//! `cilium/state/nodes/v1/<cluster>/<node>`: a remote (or our own) cluster's node object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::wire::{DataKind, KvNode, validate};
use strait_fuzz::{KvInput, round_trip, sync};

fuzz_target!(|data: &[u8]| {
    let Some(input) = KvInput::parse(data) else {
        return;
    };
    let _ = validate::decode_local_node(input.suffix, input.value);
    if let Some(remote) = &input.remote {
        let _ = validate::decode_remote_node(remote, input.suffix, input.value);
    }
    let encoded = KvNode::decode(input.value).ok().map(|node| {
        let _ = (node.key_name(), node.fullname(), node.pod_cidrs());
        let _ = (node.node_ip(false), node.node_ip(true), node.internal_ip());
        let _ = (
            node.cilium_internal_ip(false),
            node.cilium_internal_ip(true),
        );
        let _ = (node.wireguard_pub_key(), node.wireguard_pub_key_bytes());
        round_trip(&node, KvNode::encode, KvNode::decode)
    });
    sync(DataKind::Nodes, &input, encoded);
});
