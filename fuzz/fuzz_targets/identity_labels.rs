//! Identity label strings: the kvstore's sorted-list form (`k8s:app=foo;…;`), one label
//! (`source:key=value`, `$reserved`), Cilium's label filter and selectors over them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::identity::filter::is_identity_label;
use strait::identity::labels::{Label, LabelArray};
use strait::policy::{LabelSelector, Selector};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let one = Label::parse(text);
    let _ = (
        is_identity_label(&one),
        one.is_workload_label(),
        one.to_string(),
    );
    let Ok(labels) = LabelArray::parse_sorted_list(text) else {
        return;
    };
    // The sorted list is canonical: writing and reading it again changes nothing.
    let list = labels.to_sorted_list();
    let again = LabelArray::parse_sorted_list(&list).expect("a written list parses");
    assert_eq!(again, labels, "{list}");
    assert_eq!(again.to_sorted_list(), list);
    for l in labels.iter() {
        assert!(!l.key.is_empty());
        assert_eq!(labels.get(&l.key), Some(l));
        assert!(labels.contains(&l.source, &l.key, &l.value));
        let _ = is_identity_label(l);
    }
    let _ = labels.cluster_name();
    // A selector naming every label (`source:key`) matches them.
    let match_labels = labels
        .iter()
        .map(|l| (format!("{}:{}", l.source, l.key), l.value.clone()))
        .collect();
    let ls = LabelSelector {
        match_labels,
        ..LabelSelector::default()
    };
    assert!(Selector::new(&ls).matches(&labels), "{list}");
});
