//! `cilium/state/identities/v1/id/<n>`: a numeric identity and its label list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::identity::labels::LabelArray;
use strait::wire::{DataKind, validate};
use strait_fuzz::{KvInput, sync};

fuzz_target!(|data: &[u8]| {
    let Some(input) = KvInput::parse(data) else {
        return;
    };
    if let Ok(ident) = validate::decode_local_identity(input.suffix, input.value) {
        assert!(!ident.labels.is_empty());
        assert!(ident.labels.iter().all(|l| l.is_workload_label()));
    }
    let mut encoded = None;
    if let Some(remote) = &input.remote
        && let Ok(ident) = validate::decode_remote_identity(remote, input.suffix, input.value)
    {
        // Exactly one cluster label, naming the remote; only workload labels; in range.
        assert_eq!(ident.labels.cluster_name(), Some(remote.name.as_str()));
        assert!(ident.labels.iter().all(|l| l.is_workload_label()));
        assert!(remote.identity_range().contains(ident.id));
        let list = ident.labels.to_sorted_list();
        assert_eq!(
            LabelArray::parse_sorted_list(&list).as_ref(),
            Ok(&ident.labels)
        );
        encoded = Some(list.into_bytes());
    }
    sync(DataKind::Identities, &input, encoded);
});
